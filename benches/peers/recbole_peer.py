"""RecBole peer for the Table 4 timing study (`benches/bench_table4.py`).

Runs in RecBole's OWN virtual environment (never the project's: RecBole 1.2.1 needs
numpy < 2), started by the bench as a subprocess. It converts OUR training samples (an
.npz the bench writes) to RecBole's session-benchmark atomic files, builds RecBole's own
dataset, dataloader, model and optimizer through its public API, and then runs training
steps on command, so that the bench can time them side by side with ours:

    train step = next batch from RecBole's train dataloader (its batch building),
                 optimizer.zero_grad(), model.calculate_loss(interaction), backward,
                 optimizer.step(), loss.item()
    (the body of RecBole's `Trainer._train_epoch`, without its progress bar and logging).

Setup of the RecBole venv (see the top of bench_table4.py; measured here 2026-11-29):

    python3 -m venv /work/venv-recbole
    /work/venv-recbole/bin/pip install torch==2.13.0          # the CPU wheel on local disk
    /work/venv-recbole/bin/pip install --no-deps recbole==1.2.1
    /work/venv-recbole/bin/pip install "numpy<2" "pandas<3" scipy "tqdm>=4.48.2" \
        "colorlog==4.7.2" "colorama==0.4.4" "scikit-learn>=0.23.2" "pyyaml>=5.1.0" \
        "tensorboard>=2.5.0" "thop>=0.1.1.post2207130030" "tabulate>=0.8.10" "plotly>=4.0.0" \
        "texttable>=0.9.0" "psutil>=5.9.0" "ray>=1.13.0,<=2.6.3"
    export MTD_BENCH_RECBOLE_PYTHON=/work/venv-recbole/bin/python

Data conversion (the same samples, the same catalogue, the same batches):
- `<name>.train.inter`: the training samples the bench chose, in the bench's order, one
  row each (`session_id:token  item_id_list:token_seq  item_id:token`); with `shuffle`
  off (per-step mode) RecBole's batch k is exactly the bench's batch k.
- `<name>.valid.inter`: the LONGEST training prefix of the whole training set: RecBole
  pads every batch to the longest list in all its files, so per-step timing on a subset
  of samples pays the same padding width as a full epoch does.
- `<name>.test.inter`: one row `[i] -> i` for every item id 1..M missing from the two
  files above, so RecBole's catalogue is M items + its padding token, like ours (M).

Protocol: one JSON object per line on stdin; one JSON reply per line on the ORIGINAL
stdout (everything else, RecBole's logging included, goes to stderr):
    {"cmd": "setup", "model": "GRU4Rec"}  -> model, n_items, pad width, batches, config
    {"cmd": "check"}                      -> one step; finite loss and gradients or ok=false
    {"cmd": "step"}                       -> one step; its in-process seconds and loss
    {"cmd": "epoch"}                      -> one whole pass over the train dataloader
    {"cmd": "quit"}
Only RecBole's public API is called (Config, create_dataset, data_preparation,
get_model, get_trainer, init_seed, model.calculate_loss); no RecBole code is copied.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the protocol channel: the real stdout; anything printed by libraries goes to stderr
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = {"gru4rec": "GRU4Rec", "narm": "NARM", "stamp": "STAMP", "sasrec": "SASRec", "srgnn": "SRGNN"}
NAME = "t4"  # RecBole dataset token (file prefix)


def _reply(obj: dict) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def _seq_str(items: np.ndarray) -> str:
    return " ".join(map(str, items.tolist()))


def write_atomic_files(npz_path: Path, out_dir: Path) -> dict:
    """Our samples (.npz: offsets, items, targets, n_items, longest_prefix, longest_target)
    -> RecBole session-benchmark files in out_dir/NAME/."""
    z = np.load(npz_path)
    offsets, items, targets = z["offsets"], z["items"], z["targets"]
    n_items = int(z["n_items"])
    longest, longest_target = z["longest_prefix"], int(z["longest_target"])
    d = out_dir / NAME
    d.mkdir(parents=True, exist_ok=True)
    header = "session_id:token\titem_id_list:token_seq\titem_id:token\n"
    flat = items.tolist()
    off = offsets.tolist()
    tg = targets.tolist()
    with open(d / f"{NAME}.train.inter", "w") as f:
        f.write(header)
        f.writelines(f"{k}\t{' '.join(map(str, flat[off[k]:off[k + 1]]))}\t{tg[k]}\n" for k in range(len(tg)))
    n = len(tg)
    with open(d / f"{NAME}.valid.inter", "w") as f:
        f.write(header)
        f.write(f"{n}\t{_seq_str(longest)}\t{longest_target}\n")
    seen = np.zeros(n_items + 1, dtype=bool)
    seen[items] = True
    seen[targets] = True
    seen[longest] = True
    seen[longest_target] = True
    missing = np.flatnonzero(~seen[1:]) + 1
    with open(d / f"{NAME}.test.inter", "w") as f:
        f.write(header)
        f.writelines(f"{n + 1 + j}\t{i}\t{i}\n" for j, i in enumerate(missing.tolist()))
    return {"train_rows": n, "fill_rows": int(missing.size), "n_items": n_items,
            "pad_width": int(max(len(longest), int(np.diff(offsets).max()) if n else 0))}


class Peer:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="mtd-t4-recbole-"))
        os.chdir(self.work)  # RecBole writes saved/ and log_tensorboard/ under the cwd
        self.files = write_atomic_files(Path(args.samples), self.work / "data")
        self.model = None

    def setup(self, model_key: str) -> dict:
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.utils import get_model, get_trainer, init_seed

        t0 = time.perf_counter()
        name = MODELS[model_key.lower()] if model_key.lower() in MODELS else model_key
        a = self.args
        d = a.hidden
        # our settings where they exist (batch 512, d 100, Adam lr 1e-3, full-softmax CE);
        # RecBole's defaults elsewhere (dropout rates, initialisation, no weight decay)
        cfg = {
            "data_path": str(self.work / "data"),
            "checkpoint_dir": str(self.work / "saved"),
            "benchmark_filename": ["train", "valid", "test"],
            "USER_ID_FIELD": "session_id", "ITEM_ID_FIELD": "item_id",
            "load_col": {"inter": ["session_id", "item_id_list", "item_id"]},
            "alias_of_item_id": ["item_id_list"],
            "train_neg_sample_args": None, "loss_type": "CE",
            "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"},
            "train_batch_size": a.batch, "eval_batch_size": a.batch, "learner": "adam", "learning_rate": 1e-3,
            "weight_decay": 0.0, "epochs": 1, "shuffle": bool(a.shuffle), "seed": a.seed,
            "reproducibility": True, "show_progress": False, "log_wandb": False, "save_dataset": False,
            "save_dataloaders": False, "worker": 0,
            "gpu_id": "0" if a.device.startswith("cuda") else "",
            "embedding_size": d, "hidden_size": d,
            # RecBole sizes SASRec's position table by MAX_ITEM_LIST_LENGTH (default 50) but
            # does not cut pre-expanded benchmark lists: size it to the longest prefix, so
            # every model sees the whole sessions, as ours do (max_session_length=None)
            "MAX_ITEM_LIST_LENGTH": max(int(self.files["pad_width"]), 1),
        }
        if name == "SASRec":  # our SASRec: 1 block, 1 head, FFN d -> d
            cfg.update({"n_layers": a.blocks, "n_heads": a.heads, "inner_size": d})
        if name == "SRGNN":
            cfg.update({"step": a.gnn_steps})
        config = Config(model=name, dataset=NAME, config_dict=cfg)
        init_seed(config["seed"], config["reproducibility"])
        torch.set_num_threads(a.threads)
        dataset = create_dataset(config)
        train_data, _valid, _test = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        self.model, self.trainer, self.train_data, self.config = model, trainer, train_data, config
        self.opt = trainer.optimizer
        self.device = config["device"]
        self.it = iter(train_data)
        model.train()
        n_items = int(dataset.item_num)
        return {"model": name, "n_items_with_pad": n_items, "catalogue": n_items - 1,
                "pad_width": int(dataset.field2seqlen["item_id_list"]), "batches": len(train_data),
                "train_rows": len(train_data._dataset), "setup_s": time.perf_counter() - t0,
                "optimizer": type(self.opt).__name__, "device": str(self.device),
                "threads": torch.get_num_threads(),
                "config": {k: config[k] for k in ("embedding_size", "hidden_size", "train_batch_size", "learning_rate",
                                                   "MAX_ITEM_LIST_LENGTH",
                                                   "weight_decay", "loss_type", "n_layers", "n_heads", "inner_size",
                                                   "step", "dropout_prob", "dropout_probs", "hidden_dropout_prob",
                                                   "attn_dropout_prob") if k in config},
                **{f"files_{k}": v for k, v in self.files.items()}}

    def _next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.train_data)
            return next(self.it)

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        interaction = self._next_batch().to(self.device)
        self.opt.zero_grad()
        loss = self.model.calculate_loss(interaction)
        loss.backward()
        self.opt.step()
        value = loss.item()
        dt = time.perf_counter() - t0
        if not math.isfinite(value):
            raise FloatingPointError(f"RecBole loss became {value}")
        return dt, value

    def check(self) -> dict:
        """One real step, checked: finite loss, every gradient finite, at least one nonzero."""
        interaction = self._next_batch().to(self.device)
        self.opt.zero_grad()
        loss = self.model.calculate_loss(interaction)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        finite = bool(all(torch.isfinite(g).all() for g in grads))
        norm = float(sum(float(g.double().pow(2).sum()) for g in grads)) ** 0.5
        self.opt.step()
        value = loss.item()
        params_finite = bool(all(torch.isfinite(p).all() for p in self.model.parameters()))
        ok = math.isfinite(value) and finite and norm > 0 and params_finite
        return {"ok": ok, "loss": value, "grads_finite": finite, "grad_norm": norm, "params_finite": params_finite,
                "batch_rows": int(len(interaction)), "n_grads": len(grads),
                **({} if ok else {"error": f"RecBole {self.config['model']}: loss {value}, grads finite {finite}, "
                                           f"grad norm {norm}, params finite {params_finite}"})}

    def epoch(self) -> dict:
        """One whole pass over RecBole's train dataloader (its own shuffling)."""
        t0 = time.perf_counter()
        n, total = 0, 0.0
        for interaction in self.train_data:
            interaction = interaction.to(self.device)
            self.opt.zero_grad()
            loss = self.model.calculate_loss(interaction)
            loss.backward()
            self.opt.step()
            total += loss.item()
            n += 1
        self.it = iter(self.train_data)
        return {"seconds": time.perf_counter() - t0, "steps": n, "mean_loss": total / max(n, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help=".npz of our training samples (see write_atomic_files)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--gnn-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle", type=int, default=0, help="1: RecBole reshuffles (whole-epoch mode)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import recbole

    try:
        peer = Peer(args)
    except Exception as exc:  # noqa: BLE001 - reported to the bench, which fails the test
        _reply({"ok": False, "error": f"conversion failed: {exc!r}", "trace": traceback.format_exc()})
        return
    _reply({"ok": True, "ready": True, "recbole": recbole.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "workdir": str(peer.work), **peer.files})
    try:
        _serve(peer)
    finally:  # the converted files and RecBole's saved/ and log dirs
        os.chdir(tempfile.gettempdir())
        shutil.rmtree(peer.work, ignore_errors=True)


def _serve(peer: Peer) -> None:
    for line in sys.stdin:
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "quit":
                _reply({"ok": True})
                break
            if cmd == "setup":
                _reply({"ok": True, **peer.setup(req["model"])})
            elif cmd == "check":
                _reply(peer.check())
            elif cmd == "step":
                dt, value = peer.step()
                _reply({"ok": True, "seconds": dt, "loss": value})
            elif cmd == "epoch":
                _reply({"ok": True, **peer.epoch()})
            else:
                _reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:  # noqa: BLE001
            _reply({"ok": False, "error": repr(exc), "trace": traceback.format_exc()})


if __name__ == "__main__":
    main()
