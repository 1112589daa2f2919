"""Param groups as torch has them: DDCMuon's groups and schedulers, add_param_group, and parameters
outside the model the optimizer is configured for (a learnable temperature).

* Every DDCMuon group's own ``lr``, ``weight_decay`` and ``betas`` act on its parameters, whichever
  rule they take: known answers from a step on zero gradients (the decay factor ``1 - lr wd`` shows
  which rate and decay each parameter got) and equality with an optimizer built with those settings.
* LambdaLR, CosineAnnealingLR and OneCycleLR, one scheduler on DDCMuon, drive each rule as they
  would drive it alone (two optimizers, each with its own scheduler), and OneCycleLR's momentum cycle
  reaches Muon's momentum and Adam's beta1 (known first moments under a constant gradient).
* ``add_param_group`` splits a group as the constructor does.
* A parameter that is not the model's is stepped by the base rule without a frame, named in one
  warning and in ``split()``: the trajectory equals a second optimizer's, and training stays exactly
  equivariant.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaugeopt import DDCAdam, DDCMuon, SymmetryCompatible, find_gauges, symmetry_param_groups
from gaugeopt.gauges import GaugeSet
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.testing import check_equivariance, relative_error

VOCAB = 17
MUON_LR, ADAM_LR, DECAY = 0.05, 1e-2, 0.1


@functools.cache
def _reference():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                              max_seq_len=8)).double()
    tokens = torch.randint(0, VOCAB, (3, 4, 8), generator=torch.Generator().manual_seed(1))
    return model, find_gauges(model, (tokens[0],), output="logits"), list(tokens)


def lm():
    """A fresh copy of a tiny float64 language model, its gauges and three batches."""
    reference, gauges, batches = _reference()
    model = copy.deepcopy(reference)
    return model, gauges.bind(model), batches


def lm_loss(model, tokens, temperature=None):
    logits = model(tokens[:, :-1])
    if temperature is not None:
        logits = logits / temperature.exp()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model, optimizer, batches, steps, scheduler=None, temperature=None):
    for t in range(steps):
        optimizer.zero_grad()
        lm_loss(model, batches[t % len(batches)], temperature).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def zero_gradient_step(model, optimizer) -> dict[str, torch.Tensor]:
    """One step on zero gradients: the moments and the momentum stay zero, so a parameter moves by its
    decoupled weight decay alone, ``p <- (1 - lr wd) p``. Returns the parameters before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


#: The MLP's units: an isolated neuron pair, put back on its orbit's section after the step, so each
#: side's factor is the decay times a gauge element per unit; their product is the decays' product.
PAIR = ("blocks.0.ffn.up.weight", "blocks.0.ffn.down.weight")


def decay_factors(model, before) -> dict[str, float]:
    """``p_after / p_before`` of every parameter, checked to be one number per tensor; the LM head is
    left out: it decays its centred part only (its mean row is a gauge, the logit shift). For the MLP
    pair (:data:`PAIR`) the factor is that of every unit's size ``|up_i| |down_:,i|``, checked to be
    one number, stored under ``"unit size"``."""
    factors = {}
    params = dict(model.named_parameters())
    sizes = [params[PAIR[0]].detach().norm(dim=1) * params[PAIR[1]].detach().norm(dim=0),
             before[PAIR[0]].norm(dim=1) * before[PAIR[1]].norm(dim=0)]
    ratio = sizes[0] / sizes[1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-14, atol=0)
    factors["unit size"] = ratio[0].item()
    for name, p in params.items():
        if name == "head.weight" or name in PAIR:
            continue
        ratio = p.detach() / before[name]
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=0, atol=1e-15), name
        factors[name] = ratio.flatten()[0].item()
    return factors


# --------------------------------------------------------------------------------------------------
# DDCMuon: every group's own settings, for both rules
# --------------------------------------------------------------------------------------------------


def test_a_weight_decay_zero_group_is_not_decayed_and_the_others_take_their_rules_decay():
    """The usual grouping (decay for matrices, none for embeddings and norms): the second group does
    not move at all on zero gradients, the first decays by ``1 - lr wd`` at its Muon and Adam rates."""
    model, gauges, _ = lm()
    no_decay = {"embed.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"}
    named = dict(model.named_parameters())
    optimizer = DDCMuon([{"params": [p for n, p in named.items() if n not in no_decay]},
                         {"params": [named[n] for n in sorted(no_decay)], "weight_decay": 0.0}],
                        gauges, lr=MUON_LR, adam_lr=ADAM_LR, weight_decay=DECAY)
    factors = decay_factors(model, zero_gradient_step(model, optimizer))
    muon = {row.parameter for row in optimizer.split(print_table=False) if row.rule == "muon"}
    assert muon == {n for n in named if n.startswith("blocks.0.") and named[n].ndim == 2}
    assert factors.pop("unit size") == pytest.approx((1 - MUON_LR * DECAY) ** 2, rel=1e-14)
    for name, factor in factors.items():
        if name in no_decay:
            assert factor == 1.0, name
        elif name in muon:
            assert factor == pytest.approx(1 - MUON_LR * DECAY, rel=1e-14), name
        else:
            assert factor == pytest.approx(1 - ADAM_LR * DECAY, rel=1e-14), name


@pytest.mark.parametrize("group, muon, adam", [
    ({}, (MUON_LR, DECAY), (ADAM_LR, DECAY)),
    ({"lr": 0.03, "weight_decay": 0.2}, (0.03, 0.2), (0.03, 0.2)),
    ({"lr": 0.03, "adam_lr": 4e-3, "adam_weight_decay": 0.0}, (0.03, DECAY), (4e-3, 0.0)),
], ids=["constructor defaults", "the group's own, both rules", "adam_* for the Adam part only"])
def test_a_groups_own_lr_and_weight_decay_apply_to_every_parameter_in_it(group, muon, adam):
    model, gauges, _ = lm()
    optimizer = DDCMuon([{"params": model.parameters(), **group}], gauges, lr=MUON_LR, adam_lr=ADAM_LR,
                        weight_decay=DECAY)
    assert [(g["use_muon"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(True, *muon),
                                                                                            (False, *adam)]
    factors = decay_factors(model, zero_gradient_step(model, optimizer))
    assert factors["blocks.0.attn.q_proj.weight"] == pytest.approx(1 - muon[0] * muon[1], rel=1e-14)
    assert factors["embed.weight"] == pytest.approx(1 - adam[0] * adam[1], rel=1e-14)


def test_a_groups_betas_set_the_muon_momentum_and_adams_betas():
    """``betas=(b1, b2)`` in a group: Muon's momentum is ``b1`` and Adam's betas are ``(b1, b2)``; the
    trajectory equals DDCMuon built with ``momentum=b1, adam_betas=(b1, b2)``. ``momentum`` in a
    group sets its Muon part alone."""
    runs = {}
    for label, group, settings in (("group", {"betas": (0.8, 0.99)}, {}),
                                   ("constructor", {}, {"momentum": 0.8, "adam_betas": (0.8, 0.99)})):
        model, gauges, batches = lm()
        optimizer = DDCMuon([{"params": model.parameters(), **group}], gauges, lr=MUON_LR, adam_lr=ADAM_LR, **settings)
        assert [g["betas"] for g in optimizer.param_groups] == [(0.8, 0.99), (0.8, 0.99)]
        train(model, optimizer, batches, steps=4)
        runs[label] = model
    assert relative_error(runs["group"], runs["constructor"])[0] == 0.0
    model, gauges, _ = lm()
    optimizer = DDCMuon([{"params": model.parameters(), "momentum": 0.7}], gauges, adam_betas=(0.9, 0.95))
    assert [g["betas"] for g in optimizer.param_groups] == [(0.7, 0.95), (0.9, 0.95)]


def test_momentum_written_into_a_group_later_is_refused_and_nothing_changes():
    """A warm-up loop writing ``group["momentum"]`` (torch.optim.Muon's key) would otherwise be
    ignored: the step refuses it and names ``betas``."""
    model, gauges, batches = lm()
    optimizer = DDCMuon(model.parameters(), gauges, lr=MUON_LR, adam_lr=ADAM_LR)
    train(model, optimizer, batches, steps=1)
    optimizer.param_groups[0]["momentum"] = 0.9
    lm_loss(model, batches[1]).backward()
    before = copy.deepcopy(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"param group 0: \['momentum'\].*betas"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------
# Schedulers: one scheduler on DDCMuon = torch's Muon and AdamW, each with its own
# --------------------------------------------------------------------------------------------------


def _lambda(optimizer, peak):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 4))


def _cosine(optimizer, peak):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)


def _one_cycle(optimizer, peak):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=10, cycle_momentum=True,
                                               base_momentum=0.85, max_momentum=0.95)


@pytest.mark.parametrize("schedule", [_lambda, _cosine, _one_cycle], ids=["LambdaLR", "cosine", "OneCycleLR"])
def test_one_scheduler_drives_each_rule_as_it_would_drive_that_rule_alone(schedule):
    """One scheduler on DDCMuon (one max_lr per group for OneCycleLR) against two DDCMuons, one for
    the Muon group and one for the Adam group, each with its own scheduler at its own rate: the same
    trajectory bit for bit (no gauges, so nothing couples the two), and the Muon/Adam ratio of the
    rates holds at every step. (That a Muon group's momentum is its ``betas[0]``, which OneCycleLR
    cycles, is the next test.)"""
    model, _, batches = lm()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    settings = dict(lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR)
    optimizer = DDCMuon(ours.parameters(), GaugeSet([], [], ours), **settings)
    peaks = [g["lr"] for g in optimizer.param_groups]
    scheduler = schedule(optimizer, peaks)
    names = {id(p): n for n, p in ours.named_parameters()}
    theirs_by_name = dict(theirs.named_parameters())
    alone = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Adam-only one says that nothing takes Muon
        for group, peak in zip(optimizer.param_groups, peaks):
            params = [theirs_by_name[names[id(p)]] for p in group["params"]]
            single = DDCMuon([{"params": params, "use_muon": group["use_muon"]}], GaugeSet([], [], theirs), **settings)
            alone.append((single, schedule(single, peak)))
    for t in range(10):
        muon_group, adam_group = optimizer.param_groups
        assert muon_group["lr"] / adam_group["lr"] == pytest.approx(MUON_LR / ADAM_LR, rel=1e-12)
        for m, pairs in ((ours, [(optimizer, scheduler)]), (theirs, alone)):
            for opt, _ in pairs:
                opt.zero_grad()
            lm_loss(m, batches[t % len(batches)]).backward()
            for opt, sched in pairs:
                opt.step()
                sched.step()
    assert relative_error(ours, theirs)[0] == 0.0
    assert relative_error(ours, model)[0] > 1e-2


def test_one_cycle_cycles_muons_momentum_and_adams_beta1():
    """A constant gradient ``G`` makes both first moments known: Muon's ``B <- mu B + (1 - mu) G`` and
    Adam's ``m <- b1 m + (1 - b1) G`` are ``(1 - prod_t c_t) G`` after steps with coefficients ``c_t``.
    Under OneCycleLR's momentum cycle both equal that with the cycled ``c_t`` (and not with a fixed
    coefficient), so the cycle reaches both rules."""
    model, _, _ = lm()
    optimizer = DDCMuon(model.parameters(), None, lr=MUON_LR, adam_lr=ADAM_LR)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[MUON_LR, ADAM_LR], total_steps=6,
                                                    cycle_momentum=True, base_momentum=0.5, max_momentum=0.95)
    gradients = {p: torch.randn_like(p) for p in model.parameters()}
    applied = []
    for _ in range(5):
        applied.append([g["betas"][0] for g in optimizer.param_groups])
        for p in model.parameters():
            p.grad = gradients[p].clone()
        optimizer.step()
        scheduler.step()
    assert len({round(c, 6) for c, _ in applied}) == 5  # the coefficient moved on every step
    for (group, coefficients) in zip(optimizer.param_groups, zip(*applied)):
        key = "momentum_buffer" if group["use_muon"] else "exp_avg"
        expected = 1 - torch.tensor(coefficients, dtype=torch.float64).prod()
        for p in group["params"]:
            assert torch.allclose(optimizer.state[p][key], expected * gradients[p], rtol=1e-13, atol=0), key


def test_one_cycle_with_one_max_lr_for_both_rules_is_pointed_out_once():
    """One ``max_lr`` for all groups is torch's meaning of a scalar: the Muon and Adam groups then
    share a peak, which loses their ratio; DDCMuon says so, once, with the per-group form."""
    model, gauges, batches = lm()
    optimizer = DDCMuon(model.parameters(), gauges, lr=MUON_LR, adam_lr=ADAM_LR)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MUON_LR, total_steps=5)
    with pytest.warns(UserWarning, match=r"same max_lr=0\.05 .* max_lr=\[g\['lr'\] for g in optimizer\.param_groups\]"):
        train(model, optimizer, batches, steps=1, scheduler=scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, batches, steps=2, scheduler=scheduler)
        model, gauges, batches = lm()
        optimizer = DDCMuon(model.parameters(), gauges, lr=MUON_LR, adam_lr=ADAM_LR)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[MUON_LR, ADAM_LR], total_steps=5)
        train(model, optimizer, batches, steps=2, scheduler=scheduler)


# --------------------------------------------------------------------------------------------------
# add_param_group applies the constructor's split
# --------------------------------------------------------------------------------------------------


def test_add_param_group_splits_a_group_as_the_constructor_does():
    """An embedding, a norm gain and a hidden matrix added later: the matrix takes Muon at ``lr``, the
    embedding and the gain take Adam at ``adam_lr``, exactly as if they had been given at first."""
    model, gauges, batches = lm()
    later = ["embed.weight", "norm.weight", "blocks.0.ffn.up.weight"]
    named = dict(model.named_parameters())
    optimizer = DDCMuon([p for n, p in named.items() if n not in later], gauges, lr=MUON_LR, adam_lr=ADAM_LR)
    groups = len(optimizer.param_groups)
    optimizer.add_param_group({"params": [named[n] for n in later]})
    added = [(g["use_muon"], g["lr"], [n for n, p in named.items() if any(p is q for q in g["params"])])
             for g in optimizer.param_groups[groups:]]
    assert added == [(True, MUON_LR, ["blocks.0.ffn.up.weight"]), (False, ADAM_LR, ["embed.weight", "norm.weight"])]
    twin = copy.deepcopy(model)
    at_once = DDCMuon(twin.parameters(), gauges.bind(twin), lr=MUON_LR, adam_lr=ADAM_LR)
    assert sorted(optimizer.split(print_table=False)) == sorted(at_once.split(print_table=False))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) are not parameters of gauges\.model.*param group 4"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))], "lr": 0.5})
    assert (optimizer.param_groups[-1]["use_muon"], optimizer.param_groups[-1]["lr"]) == (False, 0.5)


def test_a_refused_add_param_group_adds_nothing():
    model, gauges, _ = lm()
    named = dict(model.named_parameters())
    optimizer = DDCMuon([p for n, p in named.items() if n not in ("embed.weight", "blocks.0.ffn.up.weight")],
                        gauges, lr=MUON_LR, adam_lr=ADAM_LR)
    groups = list(optimizer.param_groups)
    with pytest.raises(ValueError, match="invalid learning rate"):  # the Adam part's rate is bad
        optimizer.add_param_group({"params": [named["blocks.0.ffn.up.weight"], named["embed.weight"]],
                                   "adam_lr": -1.0})
    with pytest.raises(ValueError, match="unknown option.*'adam_beta'"):
        optimizer.add_param_group({"params": [named["embed.weight"]], "adam_beta": (0.9, 0.9)})
    assert optimizer.param_groups == groups


# --------------------------------------------------------------------------------------------------
# Parameters outside the model: the base rule, without a frame
# --------------------------------------------------------------------------------------------------


OUTSIDE = {
    "DDCAdam": (lambda params, gauges: DDCAdam(params, gauges, lr=1e-2, weight_decay=0.1),
                lambda t: torch.optim.AdamW([t], lr=1e-2, weight_decay=0.1)),
    "DDCMuon": (lambda params, gauges: DDCMuon(params, gauges, lr=MUON_LR, adam_lr=ADAM_LR, weight_decay=0.1,
                                               ns_dtype=None),  # exact equivariance
                lambda t: torch.optim.AdamW([t], lr=ADAM_LR, weight_decay=0.1)),
}


@pytest.mark.parametrize("label", list(OUTSIDE))
def test_a_parameter_outside_the_model_takes_adam_without_a_frame(label):
    """A learnable temperature of the loss: one warning names it, ``split()`` lists it without a frame,
    and the run equals the same optimizer on the model plus torch's AdamW on the temperature."""
    make, second = OUTSIDE[label]
    model, gauges, batches = lm()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    temperature = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    twin = nn.Parameter(temperature.detach().clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = make([*ours.named_parameters(), ("log_temperature", temperature)], gauges.bind(ours))
    notices = [w for w in caught if "not parameters of gauges.model" in str(w.message)]
    assert len(notices) == 1 and "log_temperature (param group" in str(notices[0].message)
    row = next(r for r in optimizer.split(print_table=False) if r.parameter == "log_temperature")
    assert (row.rule, row.frame) == ("adam", "none: outside gauges.model")
    references = (make(theirs.parameters(), gauges.bind(theirs)), second(twin))
    for t in range(5):
        for m, opts, temp in ((ours, (optimizer,), temperature), (theirs, references, twin)):
            for opt in opts:
                opt.zero_grad()
            lm_loss(m, batches[t % len(batches)], temp).backward()
            for opt in opts:
                opt.step()
    assert relative_error(ours, theirs)[0] <= 1e-12
    assert temperature.item() == pytest.approx(twin.item(), rel=1e-12) and temperature.item() != 0.3


@pytest.mark.parametrize("label", list(OUTSIDE))
def test_training_with_a_parameter_outside_the_model_stays_equivariant(label):
    make, _ = OUTSIDE[label]
    model, gauges, batches = lm()
    temperatures = {}

    def make_optimizer(m, g):
        temperatures[id(m)] = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make([*m.parameters(), temperatures[id(m)]], g)

    result = check_equivariance(make_optimizer, model, gauges, batches,
                                lambda m, b: lm_loss(m, b, temperatures[id(m)]), steps=10)
    assert result.displacement > 1e-2 and result.error <= 1e-10, result.error


def test_symmetry_compatible_steps_a_group_without_a_rule_by_adamw_and_says_so():
    model, _, batches = lm()
    temperature = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    twin = nn.Parameter(temperature.detach().clone())
    groups = symmetry_param_groups(model, verbose=False)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) are in groups that name no rule.*'adamw'.*log_temperature"):
        optimizer = SymmetryCompatible([*groups, {"params": [("log_temperature", temperature)]}], lr=1e-2)
    row = optimizer.split(print_table=False)[-1]
    assert (row.parameter, row.rule, row.frame) == ("log_temperature", "adamw", "none: not classified")
    adamw = torch.optim.AdamW([twin], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for t in range(5):
        optimizer.zero_grad()
        lm_loss(model, batches[t % len(batches)], temperature).backward()
        twin.grad = temperature.grad.clone()
        optimizer.step()
        adamw.step()
    assert temperature.item() == pytest.approx(twin.item(), rel=1e-12)
    with pytest.raises(ValueError, match="no 'rule'"):
        SymmetryCompatible([{"params": [temperature]}])


def test_a_consumer_takes_at_most_its_own_groups_share_of_a_channel_step():
    """The share of a gain's channel step ``exp(-lr_g r)`` that a consumer stepped at ``lr_c`` takes:
    ``min(lr_c, lr_g) / lr_g``; none where the gain's group or the consumer's has lr 0."""
    from gaugeopt.optim.step import channel_shares

    assert channel_shares(0.01, [0.02, 0.01, 0.005, 0.0, None]) == [0.5, 1.0, 1.0, 0.0, 0.0]
    assert channel_shares(0.0, [0.02, 0.0]) == [0.0, 0.0]


def test_the_channel_step_moves_no_consumer_at_lr_0_and_none_through_gains_at_lr_0():
    """The channel step acts on the columns of a norm's consumers: a consumer group at lr 0 stays
    exactly where it is while the rest trains; with the gains' group at lr 0 the channel step is
    no step at all (the trajectory without it, to rounding: the write then orders its products
    differently)."""
    model, gauges, batches = lm()
    frozen = {n for n, _ in model.named_parameters() if ".attn.q_proj." in n or ".attn.k_proj." in n}
    groups = [{"params": [p for n, p in model.named_parameters() if n in frozen], "lr": 0.0},
              {"params": [p for n, p in model.named_parameters() if n not in frozen], "lr": 1e-2}]
    before = copy.deepcopy(dict(model.named_parameters()))
    train(model, DDCAdam(groups, gauges, weight_decay=0.1), batches, steps=2)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["blocks.0.attn.v_proj.weight"], after["blocks.0.attn.v_proj.weight"])

    runs = []
    for channel_step in (True, False):
        model, gauges, batches = lm()
        gains = {n for n, _ in model.named_parameters() if "norm" in n}
        groups = [{"params": [p for n, p in model.named_parameters() if n in gains], "lr": 0.0},
                  {"params": [p for n, p in model.named_parameters() if n not in gains], "lr": 1e-2}]
        train(model, DDCAdam(groups, gauges, weight_decay=0.1, norm_scale_step=channel_step), batches, steps=2)
        runs.append(dict(model.named_parameters()))
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-12, atol=1e-15)
