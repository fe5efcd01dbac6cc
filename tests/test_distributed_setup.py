"""What ``ldm_compat.training.distributed`` refuses or fills in before training starts (in-process, no launch)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from ldm_compat.training import distributed


def fake_accelerator(distributed_type, *, fsdp_version=2, zero_stage=2, ds_config=None, processes=1):
    state = SimpleNamespace(
        distributed_type=distributed_type,
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
        deepspeed_plugin=SimpleNamespace(
            zero_stage=zero_stage, deepspeed_config={} if ds_config is None else ds_config
        ),
    )
    return SimpleNamespace(state=state, num_processes=processes, mixed_precision="no", print=print)


def test_deepspeed_with_accelerate_use_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ValueError, match="DeepSpeed with ACCELERATE_USE_CPU=1: Accelerate 1.15 then ignores"):
        distributed.accelerator_kwargs()


def test_deepspeed_on_a_cpu_only_machine_gets_gloo(monkeypatch):
    from accelerate.utils import InitProcessGroupKwargs

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "_accelerator_available", lambda: False)
    (handler,) = distributed.accelerator_kwargs()["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs) and handler.backend == "gloo"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert distributed.accelerator_kwargs() == {}


def test_fsdp1_and_zero3_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ValueError, match="fsdp_version 1 is not supported"):
        distributed.check_distributed_setup(fake_accelerator(DistributedType.FSDP, fsdp_version=1), tmp_path)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 is not supported"):
        distributed.check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3), tmp_path)
    distributed.check_distributed_setup(fake_accelerator(DistributedType.FSDP), tmp_path)  # FSDP2 is fine
    distributed.check_distributed_setup(fake_accelerator(DistributedType.NO), tmp_path)


def test_deepspeed_takes_accumulation_and_clipping_from_the_training_config(tmp_path):
    config = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    acc = fake_accelerator(DistributedType.DEEPSPEED, ds_config=config)
    distributed.check_distributed_setup(acc, tmp_path, accumulate_grad_batches=3, gradient_clip_val=0.5)
    # Accelerate alone would have filled the clipping with 1.0
    assert config == {"gradient_accumulation_steps": 3, "gradient_clipping": 0.5}
    missing = {}
    distributed.check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED, ds_config=missing), tmp_path)
    assert missing == {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    explicit = {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    acc = fake_accelerator(DistributedType.DEEPSPEED, ds_config=explicit)
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0 but lightning.trainer.gradient_clip_val=0.0"):
        distributed.check_distributed_setup(acc, tmp_path, accumulate_grad_batches=1, gradient_clip_val=0.0)


def test_one_machine_needs_no_shared_folder_check(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    acc = fake_accelerator(DistributedType.MULTI_CPU, processes=2)
    assert not distributed.is_multi_machine(acc)
    distributed.check_shared_output_dir(acc, tmp_path)  # no collective, nothing written
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.is_multi_machine(acc)
