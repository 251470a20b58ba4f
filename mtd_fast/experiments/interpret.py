"""`mtd-fast experiment interpret` (RQ4, the paper's Figure 5): what MTD learned.

From trained checkpoints of MTD, SR-GNN and STAMP (trained here through the resumable
runner, which saves them beside their result files, or given with `--checkpoint
MODEL=PATH`):
(a) MTD's intra-session self-attention weights for sampled test sessions, as heatmaps
    (items on both axes, causal);
(b) its aggregation weights alpha and position-decay weights beta per click;
(c) a 2-D t-SNE (scikit-learn) of session representations (180 test prefixes whose next
    items are the 6 most frequent test targets, 30 each) for the three models side by
    side, with the silhouette score of the target classes in the models' own space and in
    the 2-D projection, so the picture is not the only evidence.
Weights come from `MTD.explain` (reference ops). Writes `out/interpret/*.json|.pt` (the
runs and their checkpoints), `out/interpret_<dataset>.md`, `.json`, `_attention.png`,
`_weights.png` and `_tsne.png`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .report import ExperimentError, atomic_write_json, atomic_write_text, display_name, markdown_table, require
from .runner import checkpoint_path, dataset_part, load_spec_dataset
from .study import Study, provenance, pyplot, save_figure

__all__ = ["MODELS", "silhouette", "session_representations", "pick_classes", "pick_sessions", "run"]

MODELS = ("mtd", "srgnn", "stamp")
DEFAULTS = {"heatmap_sessions": 4, "tsne_sessions": 180, "tsne_classes": 6}


def silhouette(x: np.ndarray, labels: Sequence[Any]) -> float:
    """Mean silhouette coefficient (Euclidean): s_i = (b_i - a_i) / max(a_i, b_i), a_i the
    mean distance to the other members of i's class, b_i the smallest mean distance to
    another class; s_i = 0 for a class of one. 1 = tight, far-apart classes; ~0 = overlap."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    classes, inv = np.unique(labels, return_inverse=True)
    if len(classes) < 2 or len(classes) >= len(x):
        raise ValueError(f"silhouette needs 2 <= classes < points, got {len(classes)} classes, {len(x)} points")
    sq = (x * x).sum(1)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None))
    np.fill_diagonal(dist, 0.0)
    onehot = np.eye(len(classes))[inv]  # (n, C)
    counts = onehot.sum(0)  # (C,)
    sums = dist @ onehot  # (n, C) summed distance of each point to each class
    own = counts[inv] - 1
    a = np.where(own > 0, sums[np.arange(len(x)), inv] / np.maximum(own, 1), 0.0)
    other = np.where(onehot > 0, np.inf, sums / counts)
    b = other.min(1)
    s = np.where(own > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def session_representations(model, prefixes, batch_size: int = 512) -> np.ndarray:
    """(n, d) session vectors in evaluation mode: `model.encode(items, lengths)` where the
    model has it (MTD), else its forward (the vector scored against the items)."""
    import torch

    if not getattr(model, "neural", True):
        raise ExperimentError(f"model {model.name!r} has no session representation")
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(prefixes), batch_size):
                batch = model.batch_from_sessions(prefixes, np.arange(start, min(start + batch_size, len(prefixes))))
                rep = model.encode(batch["items"], batch["lengths"]) if hasattr(model, "encode") else model(batch)
                out.append(rep.float().cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out)


def pick_classes(targets: np.ndarray, n_sessions: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, their class = target item): the `n_classes` most frequent targets
    (ties by smaller id), up to n_sessions // n_classes samples of each, drawn at random."""
    ids, counts = np.unique(targets, return_counts=True)
    if len(ids) < n_classes:
        raise ExperimentError(f"the test set has {len(ids)} distinct targets, fewer than {n_classes} classes")
    top = ids[np.lexsort((ids, -counts))[:n_classes]]
    rng = np.random.default_rng(seed)
    per = max(1, n_sessions // n_classes)
    idx = [np.sort(rng.choice(np.flatnonzero(targets == t), size=min(per, int((targets == t).sum())), replace=False))
           for t in top]
    picked = np.concatenate(idx)
    return picked, targets[picked]


def pick_sessions(prefixes, k: int, seed: int, lo: int = 3, hi: int = 10) -> list[list[int]]:
    """k test prefixes drawn at random, preferring lengths lo..hi (readable heatmaps)."""
    lengths = prefixes.lengths
    pool = np.flatnonzero((lengths >= lo) & (lengths <= hi))
    if len(pool) < k:
        pool = np.argsort(-lengths, kind="stable")[:max(k, 1)]
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(k, len(pool)), replace=False))
    return [prefixes[int(i)].tolist() for i in chosen]


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    manifold = require("sklearn.manifold", "scikit-learn")
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # One thread: with torch's OpenMP runtime loaded beside scikit-learn's, their spinning
    # threads fought over the 2 cores and 30 points took 34-66 s; one thread took 0.16 s.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(x)


def _checkpoints(study: Study) -> dict[str, Path]:
    given = {}
    for item in study.options.get("checkpoint") or ():
        model, sep, path = item.partition("=")
        if not sep or model.lower() not in MODELS:
            raise ExperimentError(f"--checkpoint {item!r}: use MODEL=PATH with MODEL one of {', '.join(MODELS)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--checkpoint {item!r}: {path}: no such file")
        given[model.lower()] = Path(path)
    return given


def _load_checked(path: Path, name: str, ds):
    import mtd_fast

    net = mtd_fast.load(path)
    if net.n_items != ds.n_items:
        raise ExperimentError(f"{path}: a model of {net.n_items} items, but dataset {ds.name!r} has {ds.n_items}")
    if name == "mtd" and not hasattr(net, "explain"):
        raise ExperimentError(f"{path}: not an MTD model ({type(net).__name__})")
    return net


def _attention_figure(explained: dict[str, Any]):
    plt = pyplot()
    sess = explained["sessions"]
    fig, axes = plt.subplots(1, len(sess), figsize=(3.6 * len(sess), 3.4), squeeze=False)
    for ax, items, att in zip(axes[0], sess, explained["self_attention"]):
        w = att[-1].mean(0).numpy()  # last block, mean over heads (n, n)
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(items)), [str(i) for i in items], rotation=90, fontsize=7)
        ax.set_yticks(range(len(items)), [str(i) for i in items], fontsize=7)
        ax.set_xlabel("attended item (key)")
        ax.set_ylabel("item (query)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("MTD self-attention (last block, mean over heads; causal)")
    fig.tight_layout()
    return fig


def _weights_figure(explained: dict[str, Any]):
    plt = pyplot()
    sess = explained["sessions"]
    fig, axes = plt.subplots(1, len(sess), figsize=(3.6 * len(sess), 3.0), squeeze=False)
    for n, (ax, items) in enumerate(zip(axes[0], sess)):
        pos = np.arange(len(items))
        ax.bar(pos - 0.2, explained["alpha"][n].numpy(), width=0.4, label="alpha (aggregation)")
        if explained["position_decay"] is not None:
            ax.bar(pos + 0.2, explained["position_decay"][n].numpy(), width=0.4, label="beta (position decay)")
        ax.set_xticks(pos, [str(i) for i in items], rotation=90, fontsize=7)
        ax.set_xlabel("item (oldest -> most recent)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("MTD weights per click of a session")
    fig.tight_layout()
    return fig


def _tsne_figure(points: dict[str, np.ndarray], labels: np.ndarray, scores: dict[str, dict[str, float]]):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4.2), squeeze=False)
    classes = list(np.unique(labels))
    for ax, (name, p) in zip(axes[0], points.items()):
        for c in classes:
            m = labels == c
            ax.scatter(p[m, 0], p[m, 1], s=10, label=f"next item {c}")
        ax.set_title(f"{display_name(name)} (silhouette {scores[name]['silhouette']:.3f})")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("t-SNE of session representations, coloured by the next item")
    fig.tight_layout()
    return fig


def run(study: Study) -> dict[str, Any]:
    pyplot()
    require("sklearn.manifold", "scikit-learn")  # both before any training
    if study.models:
        raise ExperimentError("experiment interpret uses MTD, SR-GNN and STAMP: drop --models")
    seeds = study.seeds_or((0,))
    if len(seeds) != 1:
        raise ExperimentError(f"experiment interpret explains one trained model per architecture: give one seed, "
                              f"not {seeds}")
    seed = seeds[0]
    opts = {k: study.options.get(k) or v for k, v in DEFAULTS.items()}
    if opts["tsne_classes"] < 2 or opts["tsne_sessions"] < 2 * opts["tsne_classes"] or opts["heatmap_sessions"] < 1:
        raise ExperimentError(f"interpret needs --tsne-classes >= 2, --tsne-sessions >= twice that and "
                              f"--heatmap-sessions >= 1, got {opts}")
    given = _checkpoints(study)
    base = study.paper_spec("mtd", seed)
    ds = load_spec_dataset(base) if given else None  # a given checkpoint must fit the data: check before training
    models = {m: _load_checked(p, m, ds) for m, p in given.items()}
    specs = {m: study.paper_spec(m, seed) for m in MODELS if m not in given}
    records = study.run(list(specs.values()), checkpoints=True)
    ckpts = {**{m: checkpoint_path(study.runs_dir, s) for m, s in specs.items()}, **given}
    ds = ds or load_spec_dataset(base)
    models.update({m: _load_checked(ckpts[m], m, ds) for m in specs})
    models = {m: models[m] for m in MODELS}  # panels in the same order every time

    explained = models["mtd"].explain(pick_sessions(ds.test.prefixes, opts["heatmap_sessions"], seed))
    idx, labels = pick_classes(ds.test.targets, opts["tsne_sessions"], opts["tsne_classes"], seed)
    prefixes = ds.test.prefixes.select(idx)
    points, scores = {}, {}
    for m, net in models.items():
        reps = session_representations(net, prefixes)
        points[m] = _tsne(reps, seed)
        scores[m] = {"silhouette": silhouette(reps, labels), "silhouette_2d": silhouette(points[m], labels)}
    return _report(study, base, records, ckpts, given, explained, labels, points, scores)


def _report(study, base, records, ckpts, given, explained, labels, points, scores) -> dict[str, Any]:
    stem = f"interpret_{dataset_part(base)}"
    out = study.out
    sess = explained["sessions"]
    weights = [{"items": s, "alpha": explained["alpha"][n].tolist(),
                "position_decay": (None if explained["position_decay"] is None
                                   else explained["position_decay"][n].tolist()),
                "self_attention": None if explained["self_attention"] is None
                else explained["self_attention"][n].tolist()} for n, s in enumerate(sess)]
    classes, counts = np.unique(labels, return_counts=True)
    data = {"format": "mtd_fast/interpret", "format_version": 1, "dataset": base.dataset_key,
            "fraction": base.fraction, "seed": base.seed, "gamma": explained["gamma"],
            "checkpoints": {m: {"path": str(p), "source": "given" if m in given else "trained"}
                            for m, p in ckpts.items()},
            "sessions": weights,
            "tsne": {"classes": classes.tolist(), "counts": counts.tolist(), "labels": labels.tolist(),
                     "models": {m: {**scores[m], "points": points[m].tolist()} for m in points}}}
    rows = [{"model": display_name(m), "silhouette (model space)": f"{s['silhouette']:.4f}",
             "silhouette (t-SNE 2-D)": f"{s['silhouette_2d']:.4f}", "checkpoint": data["checkpoints"][m]["source"]}
            for m, s in scores.items()]
    md = [f"# Interpretation (RQ4, Figure 5): {base.dataset_key}", "",
          f"![attention]({stem}_attention.png)", "", f"![weights]({stem}_weights.png)", "",
          f"![t-SNE]({stem}_tsne.png)", "",
          f"## Class separation of {len(labels)} test sessions ({len(classes)} next-item classes: "
          f"{', '.join(f'{c} x{n}' for c, n in zip(classes, counts))})", "",
          markdown_table(rows, list(rows[0]), right=["silhouette (model space)", "silhouette (t-SNE 2-D)"]), "",
          f"## MTD's weights per click (gamma = {explained['gamma']:.3f})", ""]
    for w in weights:
        per = [{"click": i + 1, "item": it, "alpha": f"{w['alpha'][i]:.3f}",
                "beta": "–" if w["position_decay"] is None else f"{w['position_decay'][i]:.3f}"}
               for i, it in enumerate(w["items"])]
        md += [markdown_table(per, ["click", "item", "alpha", "beta"], right=["alpha", "beta"]), ""]
    md += [provenance(records), ""]
    text = "\n".join(md)
    paths = {"markdown": atomic_write_text(out / f"{stem}.md", text),
             "json": atomic_write_json(out / f"{stem}.json", data)}
    if explained["self_attention"] is not None:
        paths["attention"] = save_figure(_attention_figure(explained), out / f"{stem}_attention.png")
    paths["weights"] = save_figure(_weights_figure(explained), out / f"{stem}_weights.png")
    paths["tsne"] = save_figure(_tsne_figure(points, labels, scores), out / f"{stem}_tsne.png")
    return {"paths": paths, "records": records, "markdown": text, "data": data}
