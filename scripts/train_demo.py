"""Train the demo assets shipped in fastdiff/assets, on the CPU, from scikit-learn's 8x8 digits.

    python scripts/train_demo.py teacher       # the diffusion UNet (v-prediction, cosine schedule)
    python scripts/train_demo.py classifier    # the digits classifier used for the quality metrics
    python scripts/train_demo.py student       # progressive distillation of the teacher (fastdiff.training.distill)
    python scripts/train_demo.py consistency   # consistency distillation of the teacher (fastdiff.training.consistency)
    python scripts/train_demo.py head          # the OCM covariance head of the teacher
    python scripts/train_demo.py all           # all of them, in that order

Every stage is seeded; ``--iters`` and ``--threads`` trade time for quality. The times in
notes/demo.md were measured on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastdiff import demo  # noqa: E402


def _cosine_lr(opt, base_lr, it, total, warmup=100):
    lr = base_lr * min(1.0, (it + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


@torch.no_grad()
def _ema_update(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)


def train_teacher(args):
    torch.manual_seed(args.seed)
    x_data, _ = demo.load_digits()
    sched = demo.demo_schedule()
    ab = sched.alphas_cumprod.float()
    model = demo.DemoUNet(channels=(32, 64), emb_dim=64)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n = x_data.shape[0]
    t0 = time.time()
    for it in range(args.iters):
        x0 = x_data[torch.randint(0, n, (args.batch,))]
        t = torch.randint(0, sched.num_train_timesteps, (args.batch,))
        a = ab[t].sqrt()[:, None, None, None]
        s = (1 - ab[t]).sqrt()[:, None, None, None]
        eps = torch.randn_like(x0)
        v = a * eps - s * x0
        loss = F.mse_loss(model(a * x0 + s * eps, t), v)
        _cosine_lr(opt, args.lr, it, args.iters)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, 0.0 if it < 200 else args.ema)
        if it % 100 == 0 or it == args.iters - 1:
            print(f"teacher it {it:5d} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    info = {"prediction_type": "v_prediction", "schedule": demo.DEMO_SCHEDULE, "iters": args.iters,
            "batch": args.batch, "train_seconds": round(time.time() - t0, 1), "stored": "fp16 (trained in fp32)"}
    # fp16 storage halves the package (0.75 MB instead of 1.5 MB); the weights are used in fp32.
    demo.save_asset(demo.asset_path("demo_unet"), ema, "unet", info, half=True)
    print(f"wrote {demo.asset_path('demo_unet')}")


def train_classifier(args):
    torch.manual_seed(args.seed)
    x_data, y_data = demo.load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x_data.shape[0], generator=g)
    n_val = 300
    val, tr = perm[:n_val], perm[n_val:]
    model = demo.DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    iters = args.clf_iters
    t0 = time.time()
    for it in range(iters):
        idx = tr[torch.randint(0, tr.shape[0], (128,))]
        x = x_data[idx]
        # Small shifts and noise so that the features are not thrown by sampler artefacts.
        x = torch.roll(x, shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
        x = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
        loss = F.cross_entropy(model(x), y_data[idx])
        _cosine_lr(opt, 2e-3, it, iters, warmup=50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_data[val]).argmax(1) == y_data[val]).float().mean().item()
        feats = model.features(x_data).double()
    mu = feats.mean(0)
    cov = torch.cov(feats.T)
    print(f"classifier: held-out accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
    info = {"val_accuracy": round(acc, 4), "iters": iters,
            "class_freq": torch.bincount(y_data, minlength=10).div(y_data.numel()).tolist()}
    demo.save_asset(demo.asset_path("demo_classifier"), model, "classifier", info,
                    extra={"real_mu": mu.float(), "real_cov": cov.float()})
    print(f"wrote {demo.asset_path('demo_classifier')}")


def _teacher():
    model, info, _ = demo.load_asset("demo_unet")
    return model, info["prediction_type"]


def train_student(args):
    """Progressive distillation: teacher DDIM at ``--pd-teacher-steps`` halved down to 2 steps;
    the 4-step and the 2-step students are kept."""
    from fastdiff.training.distill import ProgressiveDistillation

    torch.manual_seed(args.seed)
    teacher, pred = _teacher()
    x_data, _ = demo.load_digits()
    pd = ProgressiveDistillation(teacher, None, demo.demo_schedule(), teacher_prediction_type=pred,
                                 teacher_steps=args.pd_teacher_steps, final_steps=2, iters_per_round=args.pd_iters,
                                 batch_size=args.distill_batch, lr=args.pd_lr, weighting="truncated_snr", seed=args.seed)
    t0 = time.time()
    kept = {}

    def report(rec):
        if rec["iteration"] % 100 == 0:
            print(f"student {2 * rec['steps']}->{rec['steps']} it {rec['iteration']:4d} loss {rec['loss']:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if rec["iteration"] == args.pd_iters and rec["steps"] in (4, 2):
            kept[rec["steps"]] = copy.deepcopy(pd.student).eval()

    state = os.path.join(args.state_dir, "pd_state.pt") if args.state_dir else None
    if state and os.path.exists(state):
        pd.load(state)
        print(f"resumed progressive distillation at round {pd.round}, iteration {pd.iteration}")
    pd.fit(x_data, state_path=state, save_every=100, callback=report)
    for steps, model in sorted(kept.items()):
        info = {"prediction_type": pd.student_prediction_type, "schedule": demo.DEMO_SCHEDULE,
                "timesteps": pd.base_timesteps[:: pd.teacher_steps // steps].tolist(), "steps": steps,
                "teacher_steps": args.pd_teacher_steps, "iters_per_round": args.pd_iters,
                "history": pd.history, "train_seconds": round(time.time() - t0, 1)}
        name = "demo_student" if steps == 2 else f"demo_student{steps}"
        path = os.path.join(demo.ASSETS, name + ".safetensors")
        demo.save_asset(path, model, "unet", info, half=True)
        print(f"wrote {path}")


def train_consistency(args):
    from fastdiff.training.consistency import ConsistencyDistillation

    torch.manual_seed(args.seed)
    teacher, pred = _teacher()
    x_data, _ = demo.load_digits()
    cd = ConsistencyDistillation(teacher, None, demo.demo_schedule(), teacher_prediction_type=pred,
                                 grid_steps=args.cd_grid, target_decay=0.95, distance="l2", weighting="uniform",
                                 batch_size=args.distill_batch, lr=args.cd_lr, seed=args.seed)
    t0 = time.time()

    def report(rec):
        if rec["iteration"] % 100 == 0:
            print(f"consistency it {rec['iteration']:5d} loss {rec['loss']:.5f} ({time.time() - t0:.0f} s)", flush=True)

    state = os.path.join(args.state_dir, "cd_state.pt") if args.state_dir else None
    if state and os.path.exists(state):
        cd.load(state)
        print(f"resumed consistency distillation at iteration {cd.iteration}")
    cd.fit(x_data, args.cd_iters, state_path=state, save_every=100, callback=report)
    info = {"prediction_type": cd.student_prediction_type, "schedule": demo.DEMO_SCHEDULE, "grid_steps": args.cd_grid,
            "iters": args.cd_iters, "history": cd.history, "train_seconds": round(time.time() - t0, 1)}
    demo.save_asset(demo.asset_path("demo_consistency"), cd.student, "unet", info, half=True)
    print(f"wrote {demo.asset_path('demo_consistency')}")


def train_head(args):
    """The OCM covariance head of the teacher, by fastdiff.training.ocm.train_head (probe targets
    sigma_t^2 v * Hv through the frozen teacher)."""
    from fastdiff.training.ocm import train_head as fit_head

    torch.manual_seed(args.seed)
    teacher, pred = _teacher()
    x_data, _ = demo.load_digits()
    head = demo.DemoUNet(channels=(16, 32), emb_dim=64, out_activation="ocm")
    t0 = time.time()

    def sample_x0(n, gen):
        return x_data[torch.randint(0, x_data.shape[0], (n,), generator=gen)]

    def report(step, mean):
        print(f"ocm head it {step:5d} loss {mean:.4f} ({time.time() - t0:.0f} s)", flush=True)

    history = fit_head(head, teacher, sample_x0, demo.demo_schedule(), steps=args.head_iters, batch_size=args.batch,
                       lr=1e-3, probes=2, prediction_type=pred, seed=args.seed, log_every=100, callback=report)
    info = {"schedule": demo.DEMO_SCHEDULE, "iters": args.head_iters, "probes": 2, "history": history,
            "train_seconds": round(time.time() - t0, 1)}
    demo.save_asset(demo.asset_path("demo_ocm_head"), head, "unet", info, half=True)
    print(f"wrote {demo.asset_path('demo_ocm_head')}")


STAGES = {"teacher": train_teacher, "classifier": train_classifier, "student": train_student,
          "consistency": train_consistency, "head": train_head}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES) + ["all"])
    p.add_argument("--iters", type=int, default=1500, help="teacher iterations")
    p.add_argument("--batch", type=int, default=128, help="batch of the teacher and the OCM head")
    p.add_argument("--distill-batch", type=int, default=64, help="batch of the two distillations")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pd-teacher-steps", type=int, default=16)
    p.add_argument("--pd-iters", type=int, default=300, help="iterations per halving round")
    p.add_argument("--pd-lr", type=float, default=2e-4)
    p.add_argument("--cd-grid", type=int, default=16, help="teacher DDIM steps the consistency ODE grid has")
    p.add_argument("--cd-iters", type=int, default=1500)
    p.add_argument("--cd-lr", type=float, default=2e-4)
    p.add_argument("--head-iters", type=int, default=600)
    p.add_argument("--clf-iters", type=int, default=1500)
    p.add_argument("--state-dir", default="", help="keep resumable training states here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(demo.ASSETS, exist_ok=True)
    for name in (list(STAGES) if args.stage == "all" else [args.stage]):
        STAGES[name](args)


if __name__ == "__main__":
    main()
