"""The training recipe (torchtune style): `setup`, `loss_step`, `train`, `save_checkpoint`, on top of accelerate.

Contract:
- `MtloraRecipe(cfg).setup()` seeds everything, loads the base model and tokenizer (`mtlora.base`), freezes the base,
  attaches the adapter with `mtlora.inject.attach` (adapter parameters kept in fp32 even when the base is bf16),
  enables non-reentrant gradient checkpointing when asked, builds the tokenised dataset, AdamW and the transformers
  LR scheduler, and hands model/optimizer/dataloader to `accelerate.Accelerator.prepare` (single device; DDP/FSDP
  when started with `accelerate launch` or `torchrun`). With `resume_from_checkpoint` it restores adapter,
  optimizer, scheduler, RNG, auxiliary-loss state and the data position.
- `loss_step(batch)` returns the loss terms {total, ce, spectral, balance} of one micro-batch, where
  total = ce + spectral_reg_lambda * spectral + blc_weight * balance (absent terms are None).
- `train()` runs to `total_steps` optimizer steps, logs each term separately (logging module, TensorBoard when
  enabled, `history`), writes `checkpoint-<step>` every `save_steps` (atomically, see state.py) and finally the
  adapter with `mtlora.checkpoint.save_adapter` to `<output_dir>/adapter` (config with base_model and
  base_fingerprint), the loss history (`log_history.jsonl`) and pictures of the run (loss.png, spectrum.png,
  routing.png; see plots.py). The data order of an epoch depends only on seed + epoch, so a resumed run replays exactly the
  batches, dropout masks and updates the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtlora import inject
from mtlora.errors import CheckpointError, ConfigError
from mtlora_train import state as ckpt
from mtlora_train.config import TrainConfig
from mtlora_train.data import IGNORE_INDEX, Collator, EpochSampler, load_dataset
from mtlora_train.losses import SpectralRegularizer, balance_loss, clear_routing

logger = logging.getLogger(__name__)


# Options that do not change what is computed; a resumed run may change them freely.
_OPERATIONAL = {"resume_from_checkpoint", "output_dir", "save_steps", "save_strategy", "save_total_limit",
                "logging_steps", "logging_dir", "report_to", "data_cache_dir", "dataloader_num_workers",
                "count_params_only"}


class MtloraRecipe:
    """Adapter fine-tuning of a frozen LLaMA-architecture model. See the module docstring."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.output_dir = Path(cfg.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0     # micro-batches of the current epoch already consumed
        self.history: list[dict] = []
        self.spectral: SpectralRegularizer | None = None

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, model=None, tokenizer=None) -> "MtloraRecipe":
        """Build everything; `model`/`tokenizer` may be passed in (already loaded) instead of read from disk."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # Without a GPU, accelerate only runs multi-process (gloo DDP) when told `cpu=True`; otherwise every
        # process of a `torchrun` would train alone on all the data and write the same files.
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                       log_with=self._trackers(), project_dir=cfg.logging_dir or
                                       str(self.output_dir / "runs"),
                                       cpu=world > 1 and not torch.cuda.is_available())
        if self.accelerator.num_processes != world:
            raise ConfigError(f"started as {world} processes (WORLD_SIZE) but accelerate runs "
                              f"{self.accelerator.num_processes}; launch with `accelerate launch` or `torchrun`")
        set_seed(cfg.seed)
        self._load_model(model, tokenizer)
        self._attach()
        self.dataset = load_dataset(cfg.dataset_dir, self.tokenizer, cfg.max_seq_length, cfg.prompt_format,
                                    cfg.data_cache_dir, cfg.skip_bad_records)
        logger.info("%d training examples from %s", len(self.dataset), cfg.dataset_dir)
        self._build_optimization()
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(ckpt.resolve_resume(cfg.resume_from_checkpoint, self.output_dir))
        if self.accelerator.trackers:
            self.accelerator.init_trackers("mtlora-train", config=_flat(cfg.to_dict()))
        return self

    def _trackers(self):
        if self.cfg.report_to != "tensorboard":
            return None
        import importlib.util

        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise ConfigError("report_to tensorboard needs the tensorboard package (pip install tensorboard)",
                              field="report_to")
        return "tensorboard"

    def _load_model(self, model, tokenizer) -> None:
        from mtlora.base import (DEFAULT_MODEL_ID, config_fingerprint, load_base_model, load_tokenizer,
                                 resolve_model)

        cfg = self.cfg
        path = None
        if model is None:
            path = resolve_model(cfg.model_name_or_path)
            model = load_base_model(path, torch.bfloat16 if cfg.bf16 else torch.float32, self.accelerator.device)
            # the hub id of the default model, not its cache path, so the adapter names a portable base
            self.base_model_name = cfg.model_name_or_path or DEFAULT_MODEL_ID
        else:
            self.base_model_name = cfg.model_name_or_path or getattr(model.config, "_name_or_path", None)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or path or resolve_model(cfg.model_name_or_path))
        self.model, self.tokenizer = model, tokenizer
        self.adapter_config = cfg.adapter_config(self.base_model_name, config_fingerprint(model.config))

    def _attach(self) -> None:
        model = self.model
        model.requires_grad_(False)
        self.adapters = inject.attach(model, self.adapter_config)
        for adapter in self.adapters.values():
            adapter.float()                  # fp32 master weights; MoLoRA casts activations itself
            adapter.requires_grad_(True)
            adapter.record_routing = self.cfg.uses_balance
        if self.cfg.gradient_checkpointing:
            # Non-reentrant: the forward keeps its autograd graph, so the balance loss on the recorded routing
            # weights reaches the routers (reentrant checkpointing runs the forward under no_grad).
            enable_non_reentrant_checkpointing(model)
        model.config.use_cache = False
        model.train()
        n = sum(p.numel() for a in self.adapters.values() for p in a.parameters())
        logger.info("attached %s adapter at %d sites: %s trainable parameters", self.adapter_config.method,
                    len(self.adapters), f"{n:,}")
        if self.cfg.uses_spectral:
            self.spectral = SpectralRegularizer(self.adapters, self.cfg.spectral_reg_variant,
                                                self.cfg.spectral_reg_frequency, self.cfg.spectral_reg_steps)

    def _build_optimization(self) -> None:
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        self.sampler = EpochSampler(len(self.dataset), cfg.seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.per_device_train_batch_size,
                                             sampler=self.sampler, collate_fn=Collator(pad),
                                             num_workers=cfg.dataloader_num_workers,
                                             # own generator: creating an iterator must not draw from the
                                             # global RNG, or a resumed run's dropout stream would shift
                                             generator=torch.Generator().manual_seed(cfg.seed))
        params = [p for a in self.adapters.values() for p in a.parameters()]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.model, self.optimizer, self.loader = acc.prepare(self.model, optimizer, loader)
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        # Not passed to prepare(): accelerate would step it once per process; we step it once per update.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
        if sharded and self.spectral is not None:
            raise ConfigError("spectral regularisation needs whole B matrices on every rank; use DDP, not "
                              f"{acc.distributed_type.name}", field="enable_spectral_reg")
        if sharded and (cfg.save_strategy == "epoch" or (cfg.save_strategy == "steps" and cfg.save_steps > 0)):
            raise ConfigError("resumable checkpoints hold the optimizer state of one process; with "
                              f"{acc.distributed_type.name} use --save_strategy no (the final adapter is still "
                              "written) or DDP", field="save_steps")

    # -- one micro-batch ------------------------------------------------------------------------------------------
    def loss_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Loss terms of one micro-batch (see the module docstring)."""
        cfg = self.cfg
        terms: dict[str, torch.Tensor | None] = {"ce": self._answer_ce(batch), "spectral": None, "balance": None}
        total = terms["ce"]
        if cfg.uses_balance:
            terms["balance"] = balance_loss(self.adapters.values(), batch["attention_mask"])
            clear_routing(self.adapters.values())
            if terms["balance"] is not None:
                total = total + cfg.blc_weight * terms["balance"]
        if self.spectral is not None:
            terms["spectral"] = self.spectral.loss(self.global_step, self.epoch)
            if terms["spectral"] is not None:
                total = total + cfg.spectral_reg_lambda * terms["spectral"]
        terms["total"] = total
        return terms

    def _answer_ce(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled positions (fp32), as transformers' `labels=` loss.

        On one process the LM head runs only on the positions that have a label (the answers: ~10 % of the
        batch's tokens), not on every padded position: same loss and gradients, ~20 % less time per step on CPU
        (the [tokens, vocab] logits and their log-softmax dominate otherwise). A DDP-wrapped model must be called
        through its wrapper (gradient sync hooks), so there the model's own `labels=` loss is used."""
        model = self.model
        if self.accelerator.num_processes > 1 or not hasattr(model, "get_decoder"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out.loss.float()
        labels = batch["labels"][:, 1:]                                                     # [B, T-1]
        keep = labels != IGNORE_INDEX
        with self.accelerator.autocast():       # what prepare() wraps model.forward in (mixed precision)
            hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, d]
            logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()           # [n, vocab]
        return torch.nn.functional.cross_entropy(logits, labels[keep])

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        acc, cfg = self.accelerator, self.cfg
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                   disable=not acc.is_local_main_process)
        sums: dict[str, list[float]] = {}
        while self.global_step < self.total_steps:
            loader = acc.skip_first_batches(self.loader, self.batch_in_epoch) if self.batch_in_epoch else self.loader
            # accelerate's loaders re-seed the sampler from their own iteration counter; pin it to our epoch.
            (loader if hasattr(loader, "set_epoch") else self.sampler).set_epoch(self.epoch)
            for batch in loader:
                with acc.accumulate(self.model):
                    terms = self.loss_step(batch)
                    acc.backward(terms["total"])
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                clear_routing(self.adapters.values())   # recomputation under checkpointing records again
                self.batch_in_epoch += 1
                for k, v in terms.items():
                    if v is not None:
                        sums.setdefault(k, []).append(float(v.detach()))
                if acc.sync_gradients:
                    self._after_update(sums, bar)
                    sums = {}
                    if self.global_step >= self.total_steps:
                        break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if cfg.save_strategy == "epoch":
                    self.save_checkpoint()
        bar.close()
        self.save_final()
        # every process tears the group down together: a gloo process that destroys its group and exits while a
        # peer is still busy (the main one writes the adapter and plots) sometimes aborts at exit ("terminate
        # called without an active exception"; 3 in 20 plain torchrun runs here, none of 60 with the barrier)
        acc.wait_for_everyone()
        acc.end_training()
        return self.history

    def _after_update(self, sums: dict[str, list[float]], bar) -> None:
        cfg = self.cfg
        lr = self.scheduler.get_last_lr()[0]         # the rate this update used
        self.scheduler.step()
        self.global_step += 1
        entry = {"step": self.global_step, "epoch": self.epoch, "lr": lr}
        entry.update(self._mean_terms(sums))
        self.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if (self.global_step % cfg.logging_steps == 0 or self.global_step == 1) and self.accelerator.is_main_process:
            logger.info("step %d: %s", self.global_step,
                        " ".join(f"{k}={v:.6g}" for k, v in entry.items() if k not in ("step",)))
            self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=self.global_step)
        if cfg.save_strategy == "steps" and cfg.save_steps > 0 and self.global_step % cfg.save_steps == 0:
            self.save_checkpoint()

    def _mean_terms(self, sums: dict[str, list[float]]) -> dict[str, float]:
        """Each loss term averaged over the update's micro-batches and, under DDP, over the processes (so the
        logged values do not depend on the number of processes)."""
        means = {("loss" if k == "total" else k): sum(v) / len(v) for k, v in sums.items()}
        if self.accelerator.num_processes > 1:
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            means = dict(zip(keys, self.accelerator.reduce(t, reduction="mean").tolist()))
        return means

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Native-named adapter tensors; under FSDP gathered from the sharded model (main process)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.accelerator.distributed_type.name != "FSDP":
            return inject.adapter_state_dict(model)
        full = self.accelerator.get_state_dict(self.model)           # collective: every rank must call it
        out = {}
        for prefix, adapter in inject.attached_adapters(model).items():
            for name, _ in adapter.named_parameters():
                suffix = f".{prefix}.adapter.{name}"                  # e.g. model.layers.3.mlp.adapter.lora_A
                out[f"{prefix}.{name}"] = next(v for k, v in full.items() if ("." + k).endswith(suffix))
        return out

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<global_step>` (adapter, optimizer, scheduler, RNG, data position) atomically."""
        from mtlora.checkpoint import save_adapter

        acc, step = self.accelerator, self.global_step
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            ckpt.begin_checkpoint(self.output_dir, step)
        acc.wait_for_everyone()
        torch.save(ckpt.rng_state(), tmp / f"rng_{acc.process_index}.pt")   # every rank has its own streams
        final = self.output_dir / f"checkpoint-{step}"
        if acc.is_main_process:
            save_adapter(tmp / "adapter", self.adapter_config, self.adapter_tensors())
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"spectral": self.spectral.state_dict() if self.spectral else None}, tmp / "extra.pt")
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(self._trainer_state(), indent=1), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = ckpt.finish_checkpoint(tmp, self.output_dir, step)
            ckpt.prune_checkpoints(self.output_dir, self.cfg.save_total_limit)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _trainer_state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total_steps, "data_fingerprint": self.dataset.fingerprint,
                "num_processes": self.accelerator.num_processes, "history": self.history,
                "config": self.cfg.to_dict()}

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; refuses a checkpoint of other data or another world size."""
        st = ckpt.read_state(path)
        if st["data_fingerprint"] != self.dataset.fingerprint:
            raise CheckpointError("the training data changed since this checkpoint; resuming would not replay the "
                                  "same data order", path=str(path), field="dataset_dir")
        if st["num_processes"] != self.accelerator.num_processes:
            raise CheckpointError(f"saved with {st['num_processes']} processes, now {self.accelerator.num_processes}"
                                  "; the data position would not match", path=str(path))
        current = self.cfg.to_dict()
        changed = sorted(k for k, v in st.get("config", {}).items() if k not in _OPERATIONAL and current.get(k) != v)
        if changed:  # allowed (e.g. a longer run), but the continuation is then not the original run's
            logger.warning("resuming with changed options %s; the run will differ from the original", changed)
        self.load_adapter_weights(path / "adapter")
        self.optimizer.load_state_dict(ckpt.load_torch(path, "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(path, "scheduler.pt"))
        extra = ckpt.load_torch(path, "extra.pt")
        if self.spectral is not None and extra.get("spectral"):
            self.spectral.load_state_dict(extra["spectral"])
        rank_file = f"rng_{self.accelerator.process_index}.pt"
        ckpt.set_rng_state(ckpt.load_torch(path, rank_file if (path / rank_file).is_file() else "rng_0.pt"))
        self.global_step, self.epoch = st["global_step"], st["epoch"]
        self.batch_in_epoch, self.history = st["batch_in_epoch"], st["history"]
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.global_step, self.epoch,
                    self.batch_in_epoch)

    def save_final(self) -> Path:
        """The trained adapter at <output_dir>/adapter, via mtlora.checkpoint.save_adapter."""
        from mtlora.checkpoint import save_adapter

        target = self.output_dir / "adapter"
        self.accelerator.wait_for_everyone()
        tensors = self.adapter_tensors()
        if self.accelerator.is_main_process:
            save_adapter(target, self.adapter_config, tensors)
            with open(self.output_dir / "log_history.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in self.history)
            # what produced the adapter, so `python -m mtlora_train.plots --routing` can rebuild the run
            (self.output_dir / ckpt.TRAIN_CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n",
                                                             encoding="utf-8")
            logger.info("final adapter written to %s", target)
            self._write_plots(tensors)
        return target

    def _write_plots(self, tensors: dict[str, torch.Tensor]) -> None:
        """loss.png, spectrum.png and routing.png (routing over the first training batches) in output_dir."""
        from mtlora_train.plots import write_training_plots

        usage = None
        if self.accelerator.distributed_type.name != "FSDP":      # a sharded model cannot run on one process
            usage = self.routing_usage()
        for path in write_training_plots(self.output_dir, self.history, tensors, usage):
            logger.info("wrote %s", path)

    def load_adapter_weights(self, adapter_dir: Path) -> None:
        """Adapter tensors saved by `save_adapter` into the attached adapters (checkpoints, finished runs)."""
        from mtlora.checkpoint import load_adapter

        model = self.accelerator.unwrap_model(self.model)
        _, tensors = load_adapter(adapter_dir, model.config)
        inject.load_adapter_state(model, tensors, source=str(adapter_dir))

    def routing_usage(self) -> dict[str, torch.Tensor]:
        """Mean routing weight per site and expert over `first_batches()` (mtlora_train.plots.routing_usage)."""
        from mtlora_train.plots import routing_usage

        with self.accelerator.autocast():
            return routing_usage(self.accelerator.unwrap_model(self.model), self.adapters, self.first_batches())

    def first_batches(self, num_batches: int = 4) -> list[dict[str, torch.Tensor]]:
        """The dataset's first examples as padded batches on the training device (a fixed sample)."""
        tok, bs = self.tokenizer, self.cfg.per_device_train_batch_size
        collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        n = min(len(self.dataset), bs * num_batches)
        batches = [collate([self.dataset[i] for i in range(j, min(j + bs, n))]) for j in range(0, n, bs)]
        return [{k: v.to(self.accelerator.device) for k, v in b.items()} for b in batches]


def enable_non_reentrant_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer with torch's non-reentrant implementation."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _flat(d: dict) -> dict:
    """TensorBoard hparams accept scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}
