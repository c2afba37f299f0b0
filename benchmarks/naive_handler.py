"""The baseline endpoint handler, in the style of the seed projects: full-size PIL decode,
torchvision preprocessing, fp32 NCHW, autograd on, one image per forward pass, every
probability returned. Only the benchmark serves it (IMGCLF_MMS_HANDLER=naive_handler)."""

import io
import json

import torch
from PIL import Image
from torchvision import models, transforms


class NaiveService:
    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir")
        labels = json.load(open(f"{model_dir}/labels.json"))
        self.model = models.resnet50()
        self.model.fc = torch.nn.Linear(self.model.fc.in_features, len(labels))
        self.model.load_state_dict(torch.load(f"{model_dir}/model.pt", weights_only=True))
        self.model.eval()
        self.transform = transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def handle(self, data, context):
        answers = []
        for request in data:
            image = Image.open(io.BytesIO(request.get("body"))).convert("RGB")
            logits = self.model(self.transform(image).unsqueeze(0))
            answers.append(json.dumps(torch.softmax(logits, 1)[0].tolist()))
        return answers
