"""PEFT, TRL and transformers handed lofit objects answer in lofit's words; the exact export to PEFT's BEFT.

Every call runs against the real peft / trl / transformers installed (nothing of theirs is patched).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import trl
from datasets import Dataset

import lofit
from lofit.adapters.folding import MergeError
from lofit.errors import AdapterLoadError, NotPeftError
from lofit.integrations import LofitSFTTrainer, export_peft_adapter
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

HEADS = {1: [0, 2], 2: [3]}
IDS = torch.tensor([[5, 9, 17, 33, 40, 41]])
LOFIT_LOAD = r"lofit\.LofitModel\.from_pretrained\(base_model, path\)"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    lofit.get_lofit_model(tiny_model("llama"), lofit.LofitConfig(heads=HEADS, init_std=0.3)).save_pretrained(
        folder
    )
    return folder


def sft_data() -> Dataset:
    return Dataset.from_list([{"prompt": "2 plus 2 is", "completion": " 4."}] * 4)


def sft_args(out: Path) -> trl.SFTConfig:
    return trl.SFTConfig(str(out), max_steps=1, bf16=False, report_to=[], use_cpu=True, disable_tqdm=True)


# ------------------------------------------------------------------------- a LofitConfig to PEFT
@pytest.mark.parametrize(
    "call",
    [
        lambda config: peft.get_peft_model(tiny_model("llama"), config),
        lambda config: peft.PeftModel(tiny_model("llama"), config),
        lambda config: peft.get_peft_model(
            lofit.get_lofit_model(tiny_model("llama"), lofit.LofitConfig(heads={0: [1]})), config
        ),
    ],
    ids=["get_peft_model", "PeftModel", "get_peft_model-of-a-LofitModel"],
)
def test_peft_given_a_lofit_config_names_get_lofit_model(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotPeftError, match=r"lofit\.get_lofit_model\(base_model, config\)"):
        call(lofit.LofitConfig(heads=HEADS))


def test_lofit_sft_trainer_takes_a_lofit_config_as_peft_config(tmp_path: Path) -> None:
    trainer = LofitSFTTrainer(model=tiny_model("llama"), peft_config=lofit.LofitConfig(heads=HEADS),
                              args=sft_args(tmp_path), train_dataset=sft_data(),
                              processing_class=tiny_tokenizer())  # fmt: skip
    assert isinstance(trainer.model, lofit.LofitModel) and trainer.model.selected_heads() == HEADS
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in trainer.model.adapter_parameters()}
    trainer.train()


def test_plain_trl_refuses_a_lofit_config_with_its_own_message(tmp_path: Path) -> None:
    """TRL checks isinstance(peft_config, PeftConfig) before touching it: lofit cannot add its words there
    without patching TRL; the message at least names LofitConfig (docs/integrations.md maps the call)."""
    with pytest.raises(TypeError, match="got LofitConfig"):
        trl.SFTTrainer(model=tiny_model("llama"), peft_config=lofit.LofitConfig(heads=HEADS),
                       args=sft_args(tmp_path), train_dataset=sft_data(),
                       processing_class=tiny_tokenizer())  # fmt: skip


# ------------------------------------------------------------------- a lofit folder to PEFT
@pytest.mark.parametrize(
    "call",
    [
        lambda path: peft.PeftModel.from_pretrained(tiny_model("llama"), path),
        lambda path: peft.AutoPeftModelForCausalLM.from_pretrained(path),
        lambda path: peft.PeftConfig.from_pretrained(path),
        lambda path: tiny_model("llama").load_adapter(path),  # transformers' PEFT integration
        lambda path: peft.PeftModel.from_pretrained(
            lofit.get_lofit_model(tiny_model("llama"), lofit.LofitConfig(heads={0: [1]})), path
        ),
    ],
    ids=[
        "PeftModel.from_pretrained",
        "AutoPeftModelForCausalLM",
        "PeftConfig",
        "transformers-load_adapter",
        "PeftModel.from_pretrained-of-a-LofitModel",
    ],
)
def test_peft_loaders_given_a_lofit_folder_name_lofit_from_pretrained(adapter_dir: Path, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyError, match=LOFIT_LOAD):
        call(str(adapter_dir))


def test_the_signpost_works_without_lofit_imported(adapter_dir: Path) -> None:
    script = (
        "import sys, peft\n"
        f"try:\n    peft.PeftConfig.from_pretrained({str(adapter_dir)!r})\n"
        "except KeyError as error:\n    print(error)\n"
        "assert 'lofit' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert "lofit.LofitModel.from_pretrained(base_model, path)" in out


def test_a_peft_folder_handed_to_lofit_names_peft(tmp_path: Path) -> None:
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterLoadError, match=r"PEFT adapter .* peft\.PeftModel\.from_pretrained"):
        lofit.LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "lora")


def test_register_peft_method_refuses_names_outside_peft_type() -> None:
    """Why lofit is not a registered PEFT method: PEFT 0.21 takes only names of its fixed PeftType enum."""
    from peft.utils import register_peft_method

    with pytest.raises(ValueError, match="Unknown PEFT type LOFIT"):
        register_peft_method(name="lofit", config_cls=lofit.LofitConfig, model_cls=lofit.LofitModel)


# -------------------------------------------------------------------------------- the export
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "gpt2"])
def test_an_offsets_adapter_exported_as_beft_gives_the_lofit_logits(tmp_path: Path, arch: str) -> None:
    model = lofit.get_lofit_model(tiny_model(arch), lofit.LofitConfig(heads=HEADS, init_std=0.5))
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        base_logits = tiny_model(arch)(input_ids=IDS).logits
    export_peft_adapter(model, tmp_path / "beft")
    document = json.loads((tmp_path / "beft" / "adapter_config.json").read_text())
    assert document["peft_type"] == "BEFT" and len(document["target_modules"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BEFT warns that a bias-free projection cannot merge
        loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "beft")
    with torch.no_grad():
        logits = loaded(input_ids=IDS).logits
    assert (logits - expected).abs().max().item() <= 1e-5 < (expected - base_logits).abs().max().item()


def test_auto_peft_model_loads_the_export_by_the_recorded_base_path(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = lofit.get_lofit_model(base, lofit.LofitConfig(heads=HEADS, init_std=0.5))
    export_peft_adapter(model, tmp_path / "beft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "beft")
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - model(input_ids=IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("arch", "config", "message"),
    [
        ("gpt2", lofit.LofitConfig(heads=HEADS), "Conv1D"),
        ("llama", lofit.LofitConfig(heads=HEADS, use_scale=True), "use_scale=True"),
    ],
)
def test_the_export_refuses_what_beft_cannot_hold_exactly(tmp_path: Path, arch, config, message) -> None:  # type: ignore[no-untyped-def]
    model = lofit.get_lofit_model(tiny_model(arch), config)
    with pytest.raises(MergeError, match=message):
        export_peft_adapter(model, tmp_path / "beft")
    assert not (tmp_path / "beft").exists()
