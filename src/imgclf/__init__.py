"""imgclf: fine-tune and serve torchvision image classifiers on SageMaker or locally."""

__version__ = "0.1.0"
