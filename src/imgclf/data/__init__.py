"""Datasets from ImageFolder splits, one module per concern (as timm's `data/` and torchvision's
references split them):

- decode.py: any image file to upright 8-bit RGB, and what decoding it costs (no torch)
- scan.py: listing and checking the splits, the class folders' label names (no torch)
- transforms.py: `Preprocess` and the train/eval transforms (the eval transform is also the
  endpoint's preprocessing)
- device.py: what runs on the batch's device (normalisation, batched augmentation) and the
  workers' share beside it
- loaders.py: the dataset, samplers, loaders and class weights

Nothing is imported here, so `imgclf.data.scan` and `imgclf.data.decode` load without torch.
"""
