"""cross_entropy and linear_cross_entropy on DTensors over Gloo (1 to 4 processes; a 1-D mesh and,
for 4, a 2 x 2 mesh with the rows on one mesh dim and the classes on the other): the loss and the
gradients equal the loss of the full tensors, placed as the DTensor rules promise, with one
collective in the forward per mesh dim sharding the classes (and one O(1) all-reduce per mesh dim
sharding the rows of a reduced loss) and none in the backward; and they equal torch's own
loss_parallel() where both apply."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

import online_softmax as osm
import online_softmax.distributed  # noqa: F401  (installs the DTensor rules)
from gloo import (PARTIAL, SHARD, Cases, check_count, check_placements, check_refused, close, collectives, counted,
                  distribute, full_logits, gathered, meshes, placements, reduced, spawn, vocab_sizes, worlds)
from testlib import random_logits

ROWS = 7
# Cases that fail for reasons reported and not yet fixed (a regex of their names): a known_failures
# case runs them alone, expecting them to fail; the others leave them out. None now.
KNOWN_BUGS = None
SETTINGS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(ignore_index=0),
            dict(label_smoothing=0.1, reduction="sum"), dict(z_loss=1e-4),
            dict(weight="classes", label_smoothing=0.1), dict(weight="replicate", reduction="none"),
            dict(weight="plain", reduction="sum"),
            dict(weight="classes", label_smoothing=0.2, z_loss=1e-4, ignore_index=0)]
# All -inf, NaN and +inf rows make a reduced loss NaN: their own losses and gradients are compared.
HOSTILE_SETTINGS = [dict(reduction="none"),
                    dict(weight="classes", reduction="none", label_smoothing=0.1, z_loss=1e-4)]
LINEAR_SETTINGS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(ignore_index=0, label_smoothing=0.1),
                   dict(z_loss=1e-4, reduction="sum")]


def targets(classes, ignore_index=-100):
    """Class indices of the ROWS rows: row 5 ignored, row 6 class 0 (ignored where ignore_index=0);
    the hostile rows 0-4 are not ignored."""
    t = torch.randint(0, classes, (ROWS,), generator=torch.Generator().manual_seed(classes))
    t[5], t[6] = -100, 0
    return t.masked_fill(t == -100, ignore_index)


def class_weights(classes, dtype):
    return torch.rand(classes, dtype=dtype, generator=torch.Generator().manual_seed(2)) + 0.1


def check_cross_entropy(cases, name, mesh, full, x_pl, setting, plain_target=False):
    """osm.cross_entropy of full placed ``x_pl`` (target placed like its rows, weight as the setting
    says) against the loss of the full tensor."""
    kw = dict(setting)
    weight = kw.pop("weight", None)
    reduction = kw.get("reduction", "mean")
    t = targets(full.shape[1], kw.get("ignore_index", -100))
    w = class_weights(full.shape[1], full.dtype) if weight else None
    t_pl = reduced(x_pl, 1, False)
    name = f"{name} {setting}{' plain target' * plain_target}"
    if cases.skip(name):
        return
    with cases(name):
        x = distribute(full, mesh, x_pl).requires_grad_()
        target = t if plain_target else distribute(t, mesh, t_pl)
        if weight == "classes":
            kw["weight"] = distribute(w, mesh, [Shard(0) if p.is_shard(1) else Replicate() for p in x_pl])
        elif weight == "replicate":
            kw["weight"] = distribute(w, mesh, [Replicate()] * mesh.ndim)
        elif weight == "plain":
            kw["weight"] = w
        loss, count = counted(osm.cross_entropy, x, target, **kw)
        check_count(count, collectives(mesh, x_pl, [1] if reduction == "none" else [0, 1]), "forward")
        xf = full.clone().requires_grad_()
        want = osm.cross_entropy(xf, t, **{**kw, "weight": w})
        close(gathered(loss, "loss"), want, full.dtype)
        g = random_logits(want.shape, want.dtype, seed=4)
        _, count = counted(loss.backward, distribute(g, mesh, loss.placements) if reduction == "none" else None)
        want.backward(g if reduction == "none" else None)
        if any(p.is_shard(1) for p in x_pl):
            check_count(count, range(1), "backward")
        close(gathered(x.grad, "x.grad"), xf.grad, full.dtype)
        check_placements((loss, t_pl if reduction == "none" else (Replicate(),) * mesh.ndim, "loss"),
                         (x.grad, x_pl, "x.grad"))


def check_linear_cross_entropy(cases, name, mesh, hidden, weight, h_pl, w_pl, setting):
    """osm.linear_cross_entropy of hidden and the head (weight) placed so, the target placed like
    hidden's tokens, against the loss of the full tensors, with both gradients."""
    kw = dict(setting)
    t = targets(weight.shape[0], kw.get("ignore_index", -100))
    name = f"{name} linear_cross_entropy hidden {h_pl} weight {w_pl} {setting}"
    if cases.skip(name):
        return
    with cases(name):
        h, w = distribute(hidden, mesh, h_pl).requires_grad_(), distribute(weight, mesh, w_pl).requires_grad_()
        loss = osm.linear_cross_entropy(h, w, distribute(t, mesh, reduced(h_pl, 1, False)), **kw)
        hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        want = osm.linear_cross_entropy(hf, wf, t, **kw)
        reduction = kw.get("reduction", "mean")
        close(gathered(loss, "loss"), want, hidden.dtype)
        g = random_logits(want.shape, want.dtype, seed=4)
        loss.backward(distribute(g, mesh, loss.placements) if reduction == "none" else None)
        want.backward(g if reduction == "none" else None)
        close(gathered(h.grad, "hidden.grad"), hf.grad, hidden.dtype)
        close(gathered(w.grad, "weight.grad"), wf.grad, hidden.dtype)
        # As DTensor's own F.linear gives them: Partial(sum) where a rank holds a partial sum, hidden's
        # over the mesh dim splitting the vocabulary, the head's over mesh dims splitting the tokens.
        h_grad = [Partial() if isinstance(wp, Shard) else hp for hp, wp in zip(h_pl, w_pl)]
        w_grad = [Partial() if isinstance(hp, Shard) else wp for hp, wp in zip(h_pl, w_pl)]
        check_placements((loss, reduced(h_pl, 1, False) if reduction == "none" else (Replicate(),) * mesh.ndim, "loss"),
                         (h.grad, h_grad, "hidden.grad"), (w.grad, w_grad, "weight.grad"))


def check_loss_parallel(cases, name, mesh, full, setting):
    """osm.cross_entropy against torch's loss_parallel() on x Shard(1), target Replicate."""
    kw = dict(setting)
    t = targets(full.shape[1], kw.get("ignore_index", -100))
    if kw.get("weight"):
        # loss_parallel's backward with class weights fails on an ignored row (it gathers the
        # weight at the ignore_index).
        t[5] = 1 % full.shape[1]
        kw["weight"] = distribute(class_weights(full.shape[1], full.dtype), mesh, [Replicate()])
    name = f"{name} against loss_parallel {setting}"
    if cases.skip(name):
        return
    with cases(name):
        target = distribute(t, mesh, [Replicate()])
        ours, theirs = (distribute(full, mesh, [Shard(1)]).requires_grad_() for _ in range(2))
        g = distribute(random_logits((ROWS,), full.dtype, seed=4), mesh, [Replicate()])
        g = g if kw.get("reduction") == "none" else None
        loss = osm.cross_entropy(ours, target, **kw)
        loss.backward(g)
        with loss_parallel():  # its backward too must run inside
            want = F.cross_entropy(theirs, target, **kw)
            want.backward(g)
        close(gathered(loss, "loss"), want.full_tensor(), full.dtype)
        close(gathered(ours.grad, "x.grad"), theirs.grad.full_tensor(), full.dtype)
        check_placements((loss, want.placements, "loss"), (ours.grad, theirs.grad.placements, "x.grad"))


def check_bad_placements(cases, mesh, world):
    """Refused before any collective with a ValueError naming the argument and its placement: a
    Partial input, weight, hidden or head; a target whose rows are split over the mesh dim that
    splits the classes."""
    full = random_logits((4, 9), torch.float64, seed=3)
    x = distribute(full, mesh, [Shard(1)])
    t = torch.zeros(4, dtype=torch.int64)
    h, head = random_logits((4, 5), torch.float64, seed=5), random_logits((9, 5), torch.float64, seed=6)

    def partial(value):
        return DTensor.from_local(value, mesh, [Partial()], run_check=False)

    bad = [("cross_entropy", "input", PARTIAL, lambda: osm.cross_entropy(partial(full), t)),
           ("cross_entropy", "weight", PARTIAL,
            lambda: osm.cross_entropy(x, t, weight=partial(torch.ones(9, dtype=torch.float64)))),
           ("linear_cross_entropy", "hidden", PARTIAL,
            lambda: osm.linear_cross_entropy(partial(h), distribute(head, mesh, [Shard(0)]), t)),
           ("linear_cross_entropy", "weight", PARTIAL,
            lambda: osm.linear_cross_entropy(distribute(h, mesh, [Replicate()]), partial(head), t))]
    if world > 1:
        bad.append(("cross_entropy", "target", SHARD, lambda: osm.cross_entropy(x, distribute(t, mesh, [Shard(0)]))))
    for op, arg, placement, fn in bad:
        name = f"world {world}: {op} refuses {arg} placed {placement}"
        if not cases.skip(name):
            with cases(name):
                check_refused(fn, arg, placement)


def check_losses(cases, mesh, classes, dtype):
    """Every setting in float64 with the classes split; in float32 (the same code with other
    rounding) and where each rank's loss is the local op's, the reductions and the composite one."""
    every = dtype == torch.float64
    world = mesh.size()
    finite = full_logits((ROWS, classes), dtype, world, 1, ties=slice(1, None), nonfinite=False)
    hostile = full_logits((ROWS, classes), dtype, world, 1, ties=slice(1, None))
    for x_pl in placements(mesh.ndim, 1, 0):
        name = f"mesh {tuple(mesh.shape)} {dtype} ({ROWS}, {classes}) {x_pl}"
        if not every:
            chosen = SETTINGS[-1:]
        elif any(p.is_shard(1) for p in x_pl):
            chosen = SETTINGS
        else:
            chosen = SETTINGS[:3] + SETTINGS[-1:]
        for setting in chosen:
            check_cross_entropy(cases, name, mesh, finite, x_pl, setting)
        for setting in HOSTILE_SETTINGS if every else HOSTILE_SETTINGS[-1:]:
            check_cross_entropy(cases, name + " hostile", mesh, hostile, x_pl, setting)
        if every and mesh.ndim == 1 and not x_pl[0].is_shard(0):
            check_cross_entropy(cases, name, mesh, finite, x_pl, dict(label_smoothing=0.1), True)
    # The head's rows (the vocabulary) sharded; on the 2-D mesh the tokens on the other mesh dim.
    if mesh.ndim == 1:
        layouts = [((Replicate(),), (Shard(0),)), ((Replicate(),), (Replicate(),))]
    else:
        layouts = [((Shard(0), Replicate()), (Replicate(), Shard(0)))]
    hidden = random_logits((ROWS, 6), dtype, seed=8)
    head = random_logits((classes, 6), dtype, seed=9, scale=1.0)
    for setting in LINEAR_SETTINGS if every else LINEAR_SETTINGS[-2:-1]:
        for h_pl, w_pl in layouts:
            check_linear_cross_entropy(cases, f"mesh {tuple(mesh.shape)} {dtype} ({ROWS}, 6) x ({classes}, 6)", mesh,
                                       hidden, head, h_pl, w_pl, setting)
    # loss_parallel needs a class on every rank (an empty shard fails in its gather).
    if every and mesh.ndim == 1 and len(torch.arange(classes).chunk(world)) == world:
        for reduction in ("mean", "sum", "none"):
            for setting in (dict(), dict(ignore_index=0), dict(weight=True)):
                check_loss_parallel(cases, f"mesh {tuple(mesh.shape)} {dtype} ({ROWS}, {classes})", mesh, finite,
                                    {**setting, "reduction": reduction})


def worker(rank, world, only_known=False):
    cases = Cases(rank, KNOWN_BUGS, only_known)
    every = meshes(world)
    for mesh in every:
        for classes in vocab_sizes(mesh):
            for dtype in (torch.float32, torch.float64):
                check_losses(cases, mesh, classes, dtype)
    mesh = every[0]
    full = full_logits((ROWS, 13), torch.bfloat16, 1, 1, ties=slice(1, None), nonfinite=False)
    check_cross_entropy(cases, f"world {world}: bfloat16", mesh, full, (Shard(1),), dict(label_smoothing=0.1))
    check_bad_placements(cases, mesh, world)
    cases.report()


@pytest.mark.parametrize("world, only_known", worlds(KNOWN_BUGS))
def test_dtensor_losses_equal_full_tensor_losses(world, only_known):
    spawn(worker, world, only_known)
