"""Training: ``genserve train``.

Adam(W) with linear warm-up and cosine decay, optional EMA of the weights, validation every epoch
on the held-out split, the best model (by validation bits/dim) saved as a checkpoint, and a resume
state saved every few minutes: kill it and rerun the same command, and it continues from where it
stopped. Every step reseeds torch from (seed, step, rank), so a resumed run matches an unbroken one.
Distributed data parallel through ``torchrun`` (gloo on CPU, NCCL on GPU).

A time budget (``max_minutes``) makes the schedule follow the clock: the learning rate decays over
whichever runs out first, the epochs or the minutes, and training stops cleanly when time is up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.base import DensityModel
from models.checkpoint import ARCHITECTURES, build_model, save_checkpoint, update_metadata
from models.files import atomic_write, atomic_write_bytes
from models.likelihood import bits_per_dim
from models.tools.data import ImageDataset
from models.tools.evaluate import evaluate
from models.tools.progress import progress
from models.tools.train_config import EMA, RunState, TrainConfig, lr_at, new_state, perturb, split_data  # re-exported

logger = logging.getLogger(__name__)
STATE = "train_state.safetensors"
# Budget fields a resumed run may change (extend or cut its time or epochs); the learning-rate schedule
# then follows the new budget from where the run stands.
RESUMABLE_BUDGET = ("max_minutes", "epochs")
STATE_META = "train_state.json"


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
        if self.world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out = Path(cfg.out)
        self.is_main = self.rank == 0
        self.class_counts: list[int] | None = None  # training labels per class (conditional models)

    def log(self, msg: str, *args: Any) -> None:
        if self.is_main:
            logger.info(msg, *args)

    def build(self, train: ImageDataset) -> DensityModel:
        c, h, w = train.shape
        mc = {**self.cfg.model, "in_channels": c, "height": h, "width": w}
        mc.setdefault("levels", 256)
        if self.cfg.conditional:
            if train.labels is None or train.classes is None:
                raise ValueError(f"{train.spec}: a conditional model needs labels and class names")
            mc["n_classes"] = len(train.classes)
            # p(y) for Bayes' rule: the training split's class frequencies, recorded in model.json
            self.class_counts = torch.bincount(train.labels.long(), minlength=len(train.classes)).tolist()
        return build_model(self.cfg.architecture, mc)

    def run(self) -> dict[str, Any]:
        """Train (or resume) until the epochs or the time budget run out; returns the summary."""
        cfg = self.cfg
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture '{cfg.architecture}'; known: {sorted(ARCHITECTURES)}")
        train, valid, test = split_data(cfg.data)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        r = self.start(train)
        while r.st["epoch"] < cfg.epochs and not r.out_of_time:
            self.run_epoch(r, train, valid)
        st = r.st
        result = {"best_val_bits_per_dim": st["best_val_bpd"], "epochs_done": st["epoch"], "steps": st["global_step"]}
        if self.is_main and cfg.test_eval and test is not None and (self.out / "model.json").exists():
            result["test"] = self.test_eval(test)
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result

    def start(self, train: ImageDataset) -> RunState:
        """Seed, build the model (optionally from ``init_from``), optimizer and EMA; resume if a state exists."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = self.build(train).to(self.device)
        if cfg.init_from:
            self.init_weights(model, cfg.init_from)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ema = EMA(model, cfg.ema) if cfg.ema else None
        st = new_state()
        if (self.out / STATE).exists():
            st = self.load_state(model, opt, ema)
            self.log("resuming from %s at epoch %d step %d", self.out / STATE, st["epoch"], st["step_in_epoch"])
        net: torch.nn.Module = model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        images = train.images.to(self.device)
        labels = train.labels.to(self.device) if (cfg.conditional and train.labels is not None) else None
        n_local = len(train) // self.world
        steps_per_epoch = max(1, n_local // cfg.batch_size)
        self.log(
            "training %s (%d parameters) on %s: %d images, %d steps/epoch x %d epochs, world %d, device %s",
            cfg.architecture,
            sum(p.numel() for p in model.parameters()),
            train.spec,
            len(train),
            steps_per_epoch,
            cfg.epochs,
            self.world,
            self.device,
        )
        t_start = time.time() - st["elapsed"]
        return RunState(
            model=model,
            net=net,
            opt=opt,
            ema=ema,
            st=st,
            images=images,
            labels=labels,
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * cfg.epochs,
            t_start=t_start,
            last_save=time.time(),
        )

    def init_weights(self, model: DensityModel, path: str) -> None:
        """Load a checkpoint's weights into ``model`` (a fine-tuning stage)."""
        from models.checkpoint import load_checkpoint

        init, _ = load_checkpoint(path, self.device)
        # Non-strict so a model may grow new parts (their own initialisation stays); shapes must match.
        missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"init_from {path}: weights {unexpected} do not exist in this model")
        self.log("initialised from %s (new, freshly initialised: %s)", path, missing or "none")

    def run_epoch(self, r: RunState, train: ImageDataset, valid: ImageDataset) -> None:
        """Train the rest of the current epoch (or until time is up), then validate and save the state."""
        cfg, st = self.cfg, r.st
        epoch = st["epoch"]
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        perm = perm[self.rank :: self.world][: r.steps_per_epoch * cfg.batch_size].to(self.device)
        r.model.train()
        bar = progress(
            range(st["step_in_epoch"], r.steps_per_epoch),
            total=r.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            enabled=cfg.progress and self.is_main,
            initial=st["step_in_epoch"],
        )
        run_loss = None
        for s in bar:
            run_loss = self.step(r, perm, s, bar, run_loss)
            if cfg.max_minutes and time.time() - r.t_start > cfg.max_minutes * 60:
                r.out_of_time = True
                self.log("time budget of %.1f minutes used: stopping", cfg.max_minutes)
                break
            if time.time() - r.last_save > cfg.save_every_minutes * 60:
                st["elapsed"] = time.time() - r.t_start
                self.save_state(r.model, r.opt, r.ema, st)
                r.last_save = time.time()
        if hasattr(bar, "close"):
            bar.close()
        if st["step_in_epoch"] >= r.steps_per_epoch:
            st["epoch"] += 1
            st["step_in_epoch"] = 0
        st["elapsed"] = time.time() - r.t_start
        self.end_of_period(r.model, r.ema, valid, st, train_bpd=run_loss)
        self.save_state(r.model, r.opt, r.ema, st)
        r.last_save = time.time()

    def step(self, r: RunState, perm: Tensor, s: int, bar: Any, run_loss: float | None) -> float | None:
        """One optimizer step on batch ``s`` of ``perm`` (this rank's image indices, shape (steps * batch,)).

        Returns the running training loss in bits/dim, updated every 20 steps.
        """
        cfg, st, model = self.cfg, r.st, r.model
        torch.manual_seed(cfg.seed * 1_000_003 + st["global_step"] * 7919 + self.rank)
        idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        x = perturb(r.images[idx], cfg.perturb, model.levels)
        y = r.labels[idx] if r.labels is not None else None
        elapsed = time.time() - r.t_start
        frac = st["global_step"] / r.total_steps
        if cfg.max_minutes:
            frac = max(frac, elapsed / (cfg.max_minutes * 60))
        for g in r.opt.param_groups:
            g["lr"] = lr_at(cfg, frac, st["global_step"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled):
            loss, nll = r.net(x, y)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        r.opt.step()
        if r.ema:
            r.ema.update(model)
        st["global_step"] += 1
        st["step_in_epoch"] = s + 1
        if s % 20 == 0:
            bpd = float(bits_per_dim(nll.mean(), model.dims)) * -1.0
            run_loss = bpd if run_loss is None else 0.9 * run_loss + 0.1 * bpd
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(bpd=f"{run_loss:.3f}", lr=f"{r.opt.param_groups[0]['lr']:.2e}")
        return run_loss

    def eval_model(self, model: DensityModel, ema: EMA | None) -> DensityModel:
        if ema is None:
            return model
        clone = build_model(self.cfg.architecture, dataclasses.asdict(model.config)).to(self.device)
        clone.load_state_dict({k: v.to(clone.state_dict()[k].dtype) for k, v in ema.shadow.items()})
        return clone

    @torch.no_grad()
    def validate(self, model: DensityModel, valid: ImageDataset) -> float:
        """Validation bits/dim of the training objective (exact NLL; -ELBO for a VAE), fixed noise."""
        model.eval()
        torch.manual_seed(12345)
        total, n = 0.0, 0
        for s in range(0, len(valid), self.cfg.val_batch_size):
            x = valid.images[s : s + self.cfg.val_batch_size].to(self.device)
            x = perturb(x, self.cfg.perturb, model.levels)
            y = (
                valid.labels[s : s + self.cfg.val_batch_size].to(self.device)
                if self.cfg.conditional and valid.labels is not None
                else None
            )
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled):
                _, nll = model(x, y)
            total += float(nll.float().sum())
            n += x.shape[0]
        return float(bits_per_dim(-total / n, model.dims))

    def end_of_period(
        self, model: DensityModel, ema: EMA | None, valid: ImageDataset, st: dict[str, Any], train_bpd: float | None
    ) -> None:
        if not self.is_main:
            return
        m = self.eval_model(model, ema)
        val = self.validate(m, valid)
        rec = {
            "epoch": st["epoch"],
            "step": st["global_step"],
            "minutes": round(st["elapsed"] / 60, 2),
            "train_bpd": train_bpd,
            "val_bpd": val,
        }
        st["history"].append(rec)
        self.log(
            "epoch %d step %d: train %.4f val %.4f bits/dim (%.1f min)",
            st["epoch"],
            st["global_step"],
            train_bpd or float("nan"),
            val,
            st["elapsed"] / 60,
        )
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if st["best_val_bpd"] is None or val < st["best_val_bpd"]:
            st["best_val_bpd"] = val
            save_checkpoint(
                m,
                self.out,
                dataset=self.dataset_meta(m),
                training={
                    "config": dataclasses.asdict(self.cfg),
                    "epochs_done": st["epoch"],
                    "steps": st["global_step"],
                    "minutes": round(st["elapsed"] / 60, 2),
                    "val_bits_per_dim": val,
                    "world_size": self.world,
                    "device": str(self.device),
                    "torch": torch.__version__,
                    "command": "genserve train",
                },
                metrics={},
                state_dict=m.state_dict(),
            )
            self.log("saved best checkpoint to %s (val %.4f bits/dim)", self.out, val)

    def dataset_meta(self, model: DensityModel) -> dict[str, Any]:
        name = self.cfg.data.partition(":")[0]
        from models.tools.data import NAMED

        return {
            "spec": self.cfg.data,
            "name": name,
            "shape": list(model.shape),
            "levels": model.levels,
            "classes": list(NAMED[name]["classes"]) if name in NAMED else None,
            "perturb": self.cfg.perturb,
            "class_counts": self.class_counts,
        }

    @property
    def autocast_enabled(self) -> bool:
        """bf16 autocast for training steps and validation; test evaluation always runs in float32."""
        return self.cfg.amp and (self.device.type == "cuda" or self.cfg.cpu_amp)

    def test_eval(self, test: ImageDataset) -> dict[str, Any]:
        from models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(self.out, self.device)
        report = evaluate(model, test, show_progress=self.cfg.progress)
        metrics = {
            "test_bits_per_dim": report["bits_per_dim"],
            "test_nats_per_image": report["nats_per_image"],
            "test_data": test.spec,
        }
        if "elbo_bits_per_dim" in report:
            metrics["test_elbo_bits_per_dim"] = report["elbo_bits_per_dim"]
            metrics["test_estimator"] = report["estimator"]
            metrics["test_kl_nats_per_image"] = report["kl_nats_per_image"]
        update_metadata(self.out, metrics=metrics)
        self.log("test: %s", json.dumps(metrics))
        return metrics

    # -- resume state: safetensors tensors + JSON scalars, never pickle --
    def save_state(self, model: DensityModel, opt: torch.optim.Optimizer, ema: EMA | None, st: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema:
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        names = {id(p): n for n, p in model.named_parameters()}
        steps = {}
        for group in opt.param_groups:
            for p in group["params"]:
                s = opt.state.get(p)
                if not s:
                    continue
                n = names[id(p)]
                tensors[f"opt.{n}.exp_avg"] = s["exp_avg"]
                tensors[f"opt.{n}.exp_avg_sq"] = s["exp_avg_sq"]
                steps[n] = float(s["step"])
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(self.out / STATE, lambda tmp: save_file(flat, str(tmp)))
        meta = {"state": st, "adam_steps": steps, "config": dataclasses.asdict(self.cfg)}
        atomic_write_bytes(self.out / STATE_META, json.dumps(meta).encode())

    def load_state(self, model: DensityModel, opt: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
        meta = json.loads((self.out / STATE_META).read_text())
        saved = {
            k: v
            for k, v in meta["config"].items()
            if k not in ("progress", "out", "device", "test_eval", "save_every_minutes", *RESUMABLE_BUDGET)
        }
        now = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k in saved}
        if saved != now:
            diff = sorted(k for k in saved if saved[k] != now.get(k))
            raise ValueError(
                f"{self.out / STATE_META}: resume state was made with a different config ({diff}); "
                "use another --out or delete it"
            )
        tensors = load_file(str(self.out / STATE), device=str(self.device))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema:
            ema.shadow = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")}
        for n, p in model.named_parameters():
            if n in meta["adam_steps"]:
                opt.state[p] = {
                    "step": torch.tensor(meta["adam_steps"][n]),
                    "exp_avg": tensors[f"opt.{n}.exp_avg"],
                    "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"],
                }
        return meta["state"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the best validation and test bits/dim."""
    return Trainer(cfg).run()
