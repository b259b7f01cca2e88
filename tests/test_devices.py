"""What a reading of the CUDA path found, each checked where it can be: on the CPU."""
import pytest
import torch

import inference
import main
import train
from fast import cpu_kernels
from fast.shadow_weights import ShadowAdam
from vega_utils.common import VegaError
from vega_utils.runs import checkpoint, run_folder
from vega_utils.runs.config import load_preset, resolve


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = resolve(load_preset("IEMOCAP").replace(hidden_dim=32, n_head=4, clip_dim=16, device="cpu"))
    return cfg, main.build_model(cfg)


def one_backward(model, scaler=None):
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    (loss if scaler is None else scaler.scale(loss)).backward()


@pytest.mark.skipif(cpu_kernels.kernel() is None, reason="ShadowAdam needs the CPU kernels")
def test_shadow_adam_state_resumes_in_a_fused_adamw_under_grad_scaler():
    """CPU bf16 training (ShadowAdam) resumed where fused AdamW + GradScaler run (CUDA fp16): the fused AdamW
    keeps `fused`, so it accepts GradScaler's grad_scale/found_inf (it raised an AssertionError before)."""
    _, trained = small_model()
    shadow = ShadowAdam(trained, lr=1e-3, weight_decay=0.01, decoupled=True)
    one_backward(trained)
    shadow.step()
    saved = shadow.state_dict()

    _, resumed = small_model()
    resumed.load_state_dict(trained.state_dict())
    fused = torch.optim.AdamW(resumed.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    checkpoint.load_optimizer_state(fused, saved, "last.pth")
    assert all(g["fused"] for g in fused.param_groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    fused.zero_grad()
    one_backward(resumed, scaler)
    before = [p.detach().clone() for p in resumed.parameters()]
    scaler.step(fused)
    scaler.update()
    assert any(not torch.equal(a, p) for a, p in zip(before, resumed.parameters()))   # it stepped
    steps = {float(s["step"]) for s in fused.state.values()}
    assert steps == {2.0}   # the step count came along

    # and back: a fused AdamW file into ShadowAdam, which then steps normally
    back = ShadowAdam(resumed, lr=1e-3, weight_decay=0.01, decoupled=True)
    checkpoint.load_optimizer_state(back, fused.state_dict(), "last.pth")
    back.zero_grad()
    one_backward(resumed)
    back.step()
    assert {float(s["step"]) for s in back.state.values()} == {3.0}


def test_optimizer_state_of_another_model_is_refused_in_one_line():
    _, model = small_model()
    small = torch.nn.Linear(3, 3)
    other = torch.optim.AdamW(small.parameters(), fused=True)
    small(torch.ones(1, 3)).sum().backward()
    other.step()
    mine = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(VegaError, match=r"last.pth: its optimizer state does not fit this run's AdamW"):
        checkpoint.load_optimizer_state(mine, other.state_dict(), "last.pth")


def test_rng_state_keeps_only_the_run_devices_generator(monkeypatch):
    """A CPU run never touches CUDA (on a GPU machine it initialised it, and saved every GPU's state, which a
    machine with fewer GPUs could not restore)."""
    import random

    def no_cuda(*a, **k):
        raise AssertionError("a CPU run asked CUDA for its generator state")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    gen, anchor_rng = torch.Generator(), random.Random(0)
    state = run_folder.rng_state(gen, anchor_rng, torch.device("cpu"))
    assert state["cuda"] is None
    run_folder.set_rng_state(state, gen, anchor_rng, torch.device("cpu"))
    # a file of the earlier format (every GPU's state in a list) resumed on the CPU
    run_folder.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}, gen, anchor_rng,
                       torch.device("cpu"))


def test_anchor_logits_are_float32_under_autocast():
    """100 * cos: in a 16-bit type, logits near +-100 would be rounded to steps of 1/32 (fp16) or 1/2 (bf16)."""
    from test_layout import make_batch
    cfg, model = small_model()
    model.eval()
    batch = make_batch(cfg, [5, 3, 7])
    anchors = torch.nn.functional.normalize(torch.randn(cfg.n_classes, cfg.clip_dim), dim=-1)
    with torch.no_grad(), train.autocast(torch.device("cpu"), torch.bfloat16):
        out = model(batch, anchors)
    valid = ~batch.pad_mask
    for m in ("t", "a", "v", "all"):
        logits = out[f"{m}_clip_logit"][valid]
        assert logits.dtype == torch.float32
        assert not torch.equal(logits, logits.bfloat16().float())   # not bf16 values in a float32 tensor
        assert logits.abs().max() <= 100.0 + 1e-4


def test_float32_means_float32_on_cuda():
    """One rule for training and scoring: TF32 off for matrix products and cuDNN convolutions on CUDA."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        train.exact_float32(torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32   # a CPU run changes nothing
        train.exact_float32(torch.device("cuda"))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_evaluation_precision_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.resolve_eval_amp("auto", cpu) is None            # float32 on the CPU, whatever training used
    assert train.resolve_eval_amp("auto", cuda) == torch.float16  # the reference's fp16 autocast on CUDA
    assert train.resolve_eval_amp("bf16", cpu) == torch.bfloat16
    assert train.resolve_eval_amp("off", cuda) is None
    with pytest.raises(VegaError, match="fp16 needs a CUDA device"):
        train.resolve_eval_amp("fp16", cpu)
    args = inference.parser().parse_args(["--amp", "off"])   # the old spelling still works
    assert args.eval_amp == "off"
