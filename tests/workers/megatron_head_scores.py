"""Worker: RGMModel (from a converted checkpoint) head probabilities for given token ids and step mask."""

import json
import sys

import torch

from megatron_rgm import distributed
from megatron_rgm.model.load import load_model


def main():
    mcore, inp, out = sys.argv[1:4]
    data = json.loads(open(inp).read())
    model = load_model(mcore).model
    ids = torch.tensor([data["ids"]])
    mask = torch.tensor([data["mask"]])
    with torch.no_grad():
        _, logits = model(ids, torch.arange(ids.shape[1])[None], None, step_mask=mask)
    json.dump({"scores": torch.sigmoid(logits).tolist()}, open(out, "w"))
    distributed.shutdown()


if __name__ == "__main__":
    main()
