"""Activation checkpointing is the run config's switch; DeepSpeed's own section would silently do nothing.

The 2-rank ZeRO-3 equality of losses and pruner updates with and without it is in test_zero_equivalence.py.
"""

from neuroprune_ds.config import RunConfig
from neuroprune_ds.deepspeed_config import check_deepspeed_config
from neuroprune_ds.train import config_reference, enable_activation_checkpointing
from tiny_models import tiny_model


def test_deepspeed_activation_checkpointing_section_is_refused_naming_the_run_switch():
    errors = check_deepspeed_config({"activation_checkpointing": {"partition_activations": True}}, RunConfig())
    assert errors == ["deepspeed.activation_checkpointing: has no effect on Hugging Face models (they do not call "
                      "DeepSpeed's checkpointing); remove it and set model.gradient_checkpointing=true instead"]
    assert "  model.gradient_checkpointing  (bool, default False)" in config_reference()


def test_the_switch_checkpoints_every_layer_non_reentrant():
    model = tiny_model("llama")
    enable_activation_checkpointing(model)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
