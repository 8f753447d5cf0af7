"""One training step of an OpenCLIP model with ``ISogCLRClipLoss`` in place of ``ClipLoss``.

Run (an RN50 with random weights on a random batch)::

    python examples/openclip/clip_loss.py

``--model`` picks another OpenCLIP architecture, ``--model-config`` registers a JSON config first.
"""

import argparse

import open_clip
import torch

from openclip_tau import ISogCLRClipLoss

parser = argparse.ArgumentParser(description="One OpenCLIP step with ISogCLRClipLoss.")
parser.add_argument("--model", default="RN50")
parser.add_argument("--model-config", help="a model config JSON file to register first")
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()
if args.model_config:
    open_clip.add_model_config(args.model_config)

# --8<-- [start:step]
model, _, preprocess = open_clip.create_model_and_transforms(args.model, output_dict=True)
tokenizer = open_clip.get_tokenizer(args.model)
loss_fn = ISogCLRClipLoss(2_800_000)  # was open_clip.ClipLoss(); the training set's size
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.02)

size = model.visual.image_size
size = size if isinstance(size, tuple) else (size, size)
images = torch.randn(args.batch_size, 3, *size)  # a batch of your data loader
texts = tokenizer([f"a photo of thing number {i}" for i in range(args.batch_size)])
index = torch.arange(args.batch_size)  # the dataset index of each image-text pair

out = model(images, texts)
loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], index=index)
loss.backward()
optimizer.step()
print(loss.item(), loss_fn.stats["tau_image_p50"].item(), loss_fn.tau_image.shape)
# --8<-- [end:step]
