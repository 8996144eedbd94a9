"""Loads exported models in a fresh process where neuroprune_ds cannot be imported, as a user would.

    python tests/export_reload.py JOBS.pt RESULTS.pt

JOBS.pt is a list of dicts: dir, auto_class (a transformers Auto* name), trust_remote_code, inputs (a dict of
tensors) and generate (greedy new tokens, 0 for none). For each, RESULTS.pt gets the logits, the parameter
count, the model class and its module, and the generated ids (or the exception text).
"""

import importlib.util
import os
import sys
import traceback

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
# the editable install puts a checkout of the repository on sys.path (this one, or another sharing the
# environment): take off every entry holding the package, and the working directory
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != REPO
               and not os.path.isdir(os.path.join(p or os.getcwd(), "neuroprune_ds"))]
assert importlib.util.find_spec("neuroprune_ds") is None, "neuroprune_ds is importable in the reload process"

import torch  # noqa: E402
import transformers  # noqa: E402


def load(job: dict) -> dict:
    auto_class = getattr(transformers, job["auto_class"])
    model = auto_class.from_pretrained(job["dir"], trust_remote_code=job["trust_remote_code"],
                                       dtype=torch.float32).eval()
    with torch.no_grad():
        result = {"logits": model(**job["inputs"]).logits,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "class": type(model).__name__, "module": type(model).__module__}
        if job["generate"]:
            inputs = {k: v for k, v in job["inputs"].items() if k != "decoder_input_ids"}
            result["generated"] = model.generate(**inputs, max_new_tokens=job["generate"], do_sample=False)
    return result


def main() -> None:
    jobs = torch.load(sys.argv[1], weights_only=False)
    results = []
    for job in jobs:
        try:
            results.append(load(job))
        except Exception:
            results.append({"error": traceback.format_exc()})
    assert not any(name.startswith("neuroprune_ds") for name in sys.modules)
    torch.save(results, sys.argv[2])


if __name__ == "__main__":
    main()
