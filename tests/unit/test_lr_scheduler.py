"""LR / weight-decay schedules against their closed forms (spec §10 "LR formula")."""
import math

import pytest
import torch

from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler


def _sched(style, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    opt.param_groups[0]["wd_mult"] = 1.0
    args = dict(max_lr=1.0, min_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110, lr_decay_style=style,
                start_wd=0.01, end_wd=0.01, wd_incr_steps=110, init_lr=0.0)
    args.update(kw)
    return OptimizerParamScheduler(opt, **args), opt


def _lr_at(style, n, **kw):
    s, opt = _sched(style, **kw)
    s.step(n)
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_warmup_is_linear_from_init(style):
    assert _lr_at(style, 0) == 0.0
    assert _lr_at(style, 5) == pytest.approx(0.5)
    assert _lr_at(style, 5, init_lr=0.2) == pytest.approx(0.6)


def test_decay_styles_closed_form():
    n = 60  # ratio (60 - 10) / 100 = 0.5
    assert _lr_at("constant", n) == 1.0
    assert _lr_at("linear", n) == pytest.approx(0.1 + 0.5 * 0.9)
    assert _lr_at("cosine", n) == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * 0.5) + 1) * 0.9)
    assert _lr_at("inverse-square-root", 40) == pytest.approx(math.sqrt(10) / math.sqrt(40))
    assert _lr_at("linear", 111) == 0.1 and _lr_at("cosine", 500) == 0.1


@pytest.mark.parametrize("anneal,coeff", [("exponential", 2 * 0.5**0.5 - 1), ("linear", 0.5),
                                          ("cosine", 0.5), ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd(anneal, coeff):
    kw = dict(wsd_decay_steps=20, lr_wsd_decay_style=anneal)
    assert _lr_at("WSD", 90, **kw) == 1.0  # still stable
    assert _lr_at("WSD", 100, **kw) == pytest.approx(0.1 + coeff * 0.9)


def test_weight_decay_increment_and_state():
    s, opt = _sched("linear", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    s.step(55)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    state = s.state_dict()
    assert state["num_steps"] == 55 and state["lr_decay_style"] == "linear"
    t, opt2 = _sched("linear", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    t.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="--lr-decay-style"):
        _sched("triangle")


def test_decoupled_lr_groups_follow_their_own_bounds():
    """--decoupled-lr / --decoupled-min-lr: the embedding and output weights' group runs the
    same schedule between its own max and min; the others are untouched by it."""
    from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig

    class _PS:
        tp_rank, tp_size, pp_size, is_pipeline_first_stage, mp_group = 0, 1, 1, True, None

    names = ("embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
             "output_layer.weight")
    named = [(n, torch.nn.Parameter(torch.ones(4, 4))) for n in names]
    for _, p in named:
        p.main_grad = torch.ones(4, 4)
    cfg = OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0, sgd_momentum=0.0, clip_grad=0.0,
                          decoupled_lr=0.5, decoupled_min_lr=0.05)
    opt = MixedPrecisionOptimizer(named, cfg, _PS())
    assert [len(g["params"]) for g in opt.param_groups] == [1, 0, 2, 0]
    sched = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110,
                                    lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=110)
    sched.step(60)  # half way through the cosine: the mean of max and min
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.275)
    opt.step()
    assert [p[0, 0].item() for _, p in named] == pytest.approx([1 - 0.275, 1 - 0.55, 1 - 0.275])


def test_load_checks_the_schedule_settings_before_changing_anything():
    """A resumed schedule must agree with the saved one (spec §4.5), unless told which wins."""
    saved, _ = _sched("linear")
    saved.step(30)
    state = saved.state_dict()
    other, _ = _sched("cosine")
    with pytest.raises(ValueError, match="lr_decay_style is 'linear' in the checkpoint but 'cosine' now"):
        other.load_state_dict(state)
    assert other.lr_decay_style == "cosine" and other.num_steps == 0  # untouched by the refusal
    other.load_state_dict(state, override=True)
    assert other.lr_decay_style == "cosine" and other.num_steps == 30
    taken, _ = _sched("cosine")
    taken.load_state_dict(state, use_checkpoint=True)
    assert taken.lr_decay_style == "linear" and taken.num_steps == 30
