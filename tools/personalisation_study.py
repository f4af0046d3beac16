"""Does on-device fine-tuning help people unlike the training set, and does it beat the obvious baseline?

    python -m tools.personalisation_study --model DIR [--corpora nemo,ravdess] [--answers 5,10,20,40]
                                          [--orders 5] [--ravdess-orders 10] [--modes corrections,thumbs,mixed]
                                          [--policy NAME=k:v,k:v ...] [--out DIR]

Users: the unseen nEMO speakers IC0, MK0 and TP0 (``--orders`` random answer orders each) and the RAVDESS test
actors 21-24 (``--ravdess-orders`` orders each; an actor has 28 four-class clips, so RAVDESS stops at 20 answers).
For every (user, order, number of answers, answer mode) *trial* the same answers go to:

* the SDK as it ships: a fresh ``edge_sdk.Device`` with the default ``TrainPolicy`` (its feedback store,
  guard and TFLite ``train`` signature), plus any ``--policy`` variants;
* **plain fine-tune**: the head from the global head, Adam (lr 0.01, full batch, 100 steps) on the same answers
  (cross-entropy for thumbs-up and corrections, the complementary loss for a bare thumbs-down), no class
  balancing, no replay, no guard;
* **best plain fine-tune in hindsight**: the best of a grid of plain fine-tunes (Adam lr 1e-3/1e-2/3e-2 x
  30/100/300 steps) chosen per cell *on the scored clips*: an optimistic reference no device could reach.

Answers come from the global head's predictions: thumbs-up when right; when wrong, the corrected label
(mode ``corrections``), a bare thumbs-down (mode ``thumbs``), or either with even odds (mode ``mixed``, the same
draw per clip in every run). Every method is scored on the same clips: the
user's clips after the first 40 (nEMO) or 20 (RAVDESS) of the order. The device is taken to have heard all of its
user's clips (speaker statistics from all of them). Embeddings are computed once per model and cached in
``.cache/personalisation-study`` (the encoder is frozen).

Prints and writes (``--out``) ``personalisation.md``, ``results.json`` (every trial) and ``gain-vs-answers.png``.
Standard errors are over trials (speaker x order); orders of one speaker share that speaker's clips.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NEMO_TEST = ("IC0", "MK0", "TP0")
RAVDESS_TEST = ("ravdess-21", "ravdess-22", "ravdess-23", "ravdess-24")
NEMO_EMOTIONS = {"anger": "angry", "happiness": "happy", "neutral": "neutral", "sadness": "sad"}
PLAIN = {"lr": 0.01, "steps": 100}
GRID = [{"lr": lr, "steps": s} for lr in (1e-3, 1e-2, 3e-2) for s in (30, 100, 300)]
# share of wrong predictions answered with a bare thumbs-down (the rest are corrected); "mixed": a user who corrects
# about half of the wrong predictions and only rejects the others
MODES = {"corrections": 0.0, "thumbs": 1.0, "mixed": 0.5}
CORPORA = ("nemo", "ravdess")
REPO = Path(__file__).resolve().parents[1]


# -- corpora ---------------------------------------------------------------------------------------
def default_nemo_root() -> Path | None:
    cand = REPO.parent / "shared" / "data" / "nemo"
    return cand if cand.is_dir() else None


def nemo_clips(root: Path, speakers=None) -> list:
    """nEMO's ``{speaker}/{speaker}_{emotion}_{sentence}.flac`` (the models.datasets loader when it has one)."""
    from models.datasets import Clip

    try:
        from models.datasets import load_corpus

        clips = load_corpus("nemo", root)
    except Exception:  # noqa: BLE001 - an older models.datasets without nEMO: parse the names here
        clips = []
        for path in sorted(Path(root).glob("*/*.flac")):
            parts = path.stem.split("_")
            if len(parts) == 3 and parts[1] in NEMO_EMOTIONS:
                clips.append(Clip(str(path), f"nemo-{parts[0]}", NEMO_EMOTIONS[parts[1]]))
    return [c for c in clips if speakers is None or c.speaker.split("-", 1)[-1] in speakers]


def user_clips(corpus: str, users: tuple[str, ...] | None = None) -> list:
    """The clips of ``users`` (nEMO speaker codes, or RAVDESS actor numbers or ``ravdess-N``); default the test
    speakers."""
    from models.datasets import default_ravdess_root, ravdess_clips

    if corpus == "nemo":
        root = default_nemo_root()
        if root is None:
            raise SystemExit("needs nEMO at ../shared/data/nemo")
        return nemo_clips(root, tuple(users) if users else NEMO_TEST)
    root = default_ravdess_root()
    if root is None:
        raise SystemExit("needs RAVDESS ($FEDSER_RAVDESS or ../shared/data/ravdess)")
    wanted = tuple(u if u.startswith("ravdess-") else f"ravdess-{int(u):02d}" for u in users) if users \
        else RAVDESS_TEST
    return [c for c in ravdess_clips(root) if c.speaker in wanted]


def embeddings(corpus: str, clips: list, model_files: tuple[Path, Path], cache: Path
               ) -> tuple[list, np.ndarray, np.ndarray]:
    """(clips kept, their embeddings, their model inputs), cached by the model files' sha256 and the clip list."""
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from models.evaluate import device_inputs

    sha = hashlib.sha256(model_files[0].read_bytes() + model_files[1].read_bytes()).hexdigest()[:16]
    key = hashlib.sha256("\n".join(c.path for c in clips).encode()).hexdigest()[:12]
    path = cache / f"{corpus}-{sha}-{key}-features.npz"
    by_path = {c.path: c for c in clips}
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return [by_path[str(p)] for p in data["paths"]], data["emb"], data["features"]
    meta = ModelMetadata.load(model_files[1])
    model = TFLiteModel(model_files[0], meta)
    kept, inputs, skipped = device_inputs(clips, meta)
    emb = np.stack([model.infer(x)[1] for x in inputs]).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    feats = np.stack(inputs).astype(np.float32)
    np.savez(path, paths=np.array([c.path for c in kept]), emb=emb, features=feats)
    if skipped:
        print(f"{corpus}: skipped {dict(skipped)}", flush=True)
    return kept, emb, feats


# -- the plain fine-tune, in numpy (the same head: relu(e W0 + b0) W1 + b1, or any w0..wN, relu between) ----
def head_logits(w: dict, x: np.ndarray) -> tuple[np.ndarray, list]:
    """Logits of the head ``w0, b0, ..., wN, bN`` (ReLU after every layer but the last) and each layer's input."""
    n = sum(1 for k in w if k.startswith("w"))
    hs = [x]
    for i in range(n - 1):
        hs.append(np.maximum(hs[-1] @ w[f"w{i}"] + w[f"b{i}"], 0.0))
    return hs[-1] @ w[f"w{n - 1}"] + w[f"b{n - 1}"], hs


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def plain_finetune(w: dict, x: np.ndarray, target: np.ndarray, sign: np.ndarray, *, lr: float, steps: int,
                   train_last: int = 0) -> dict:
    """Adam on the whole head from ``w`` (``train_last`` > 0: its last ``train_last`` layers only): cross-entropy
    toward ``target`` (sign +1) or ``-log(1 - p[target])`` (sign -1), mean over the answers; nothing else."""
    w = {k: v.astype(np.float64).copy() for k, v in w.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    n = sum(1 for k in w if k.startswith("w"))
    onehot = np.eye(w[f"b{n - 1}"].shape[0])[target]
    for t in range(1, steps + 1):
        z, hs = head_logits(w, x)
        p = softmax(z)
        pt = (p * onehot).sum(axis=1, keepdims=True)
        pt = np.clip(pt, 0.0, 1.0 - 1e-6)
        # d(cross-entropy)/dz = p - onehot; d(-log(1 - pt))/dz = pt / (1 - pt) * (onehot - p)
        dz = np.where(sign[:, None] > 0, p - onehot, pt / (1.0 - pt) * (onehot - p)) / len(x)
        grads, d = {}, dz
        for i in reversed(range(n)):  # back through each layer; ReLU on all but the last
            grads[f"w{i}"], grads[f"b{i}"] = hs[i].T @ d, d.sum(0)
            if i:
                d = (d @ w[f"w{i}"].T) * (hs[i] > 0)
        for k in w:
            if 0 < train_last < n and int(k[1:]) < n - train_last:
                continue
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v2[k] = 0.999 * v2[k] + 0.001 * grads[k] ** 2
            w[k] -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v2[k] / (1 - 0.999**t)) + 1e-7)
    return {k: v.astype(np.float32) for k, v in w.items()}


# -- the study -------------------------------------------------------------------------------------
def parse_policy(text: str) -> tuple[str, dict]:
    """``NAME=key:value,key:value`` -> (name, TrainPolicy overrides)."""
    from edge_sdk.device import TrainPolicy
    from tools.simulate import option_type

    name, _, rest = text.partition("=")
    fields = TrainPolicy.__dataclass_fields__
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition(":")
        if k not in fields:
            raise SystemExit(f"--policy {text!r}: TrainPolicy has no field {k!r}")
        typ = option_type(k, TrainPolicy)  # X | None fields take an X
        over[k] = (v.lower() in ("1", "true", "yes")) if typ is bool else typ(v)
    return name, over


def run_study(args) -> dict:
    from edge_sdk.device import Device, TrainPolicy, labels_with_input_affine
    from edge_sdk.model import ModelMetadata, TFLiteModel

    model_files = ((args.model, args.model.with_suffix(".json")) if args.model.suffix == ".tflite"
                   else (args.model / "model.tflite", args.model / "model.json"))
    meta = ModelMetadata.load(model_files[1])
    labels = list(meta.labels)
    global_head = TFLiteModel(model_files[0], meta).get_weights()
    policies = {} if args.skip_default and args.policy else {"SDK default": {}}
    policies.update(parse_policy(p) for p in args.policy)
    answer_counts = sorted(int(a) for a in args.answers.split(","))
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in args.corpora.split(","):
            users = getattr(args, f"{corpus}_users", None)
            users = tuple(filter(None, users.split(","))) if users else None
            clips, emb, feats = embeddings(corpus, user_clips(corpus, users), model_files, args.cache)
            y = np.array([labels.index(c.label) for c in clips])
            pred = np.argmax(softmax(head_logits(global_head, emb)[0]), axis=1)
            per_speaker = min(np.sum([c.speaker == s for c in clips]) for s in {c.speaker for c in clips})
            counts = [n for n in answer_counts if n <= per_speaker - 8]
            last = max(counts)
            orders = args.orders if corpus == "nemo" else args.ravdess_orders
            speakers = sorted({c.speaker for c in clips})
            print(f"{corpus}: {len(clips)} clips of {speakers}; global per-clip accuracy {np.mean(pred == y):.3f}; "
                  f"answers {counts}; {orders} orders; scored on clips after the first {last}", flush=True)
            for si, spk in enumerate(speakers):
                mine = np.array([i for i, c in enumerate(clips) if c.speaker == spk])
                for order in range(orders):
                    rng = np.random.default_rng([args.seed, si, order, len(corpus)])
                    perm = mine[rng.permutation(len(mine))]
                    scored = perm[last:]
                    coin = rng.random(len(perm))  # one draw per clip: the same answer in every mode's run
                    for mode, down_rate in MODES.items():
                        if mode not in args.modes.split(","):
                            continue
                        for n in counts:
                            ans = perm[:n]
                            trial = {"corpus": corpus, "speaker": spk, "order": order, "mode": mode, "answers": n}
                            kinds = ["up" if pred[i] == y[i] else ("down" if coin[k] < down_rate else "label")
                                     for k, i in enumerate(ans)]
                            trial["answer_kinds"] = {k: kinds.count(k) for k in ("up", "down", "label")}
                            def acc(w, x=emb[scored], truth=y[scored]) -> float:
                                return float(np.mean(np.argmax(head_logits(w, x)[0], axis=1) == truth))

                            trial["global"] = acc(global_head)
                            target = np.array([pred[i] if k != "label" else y[i]
                               for k, i in zip(kinds, ans, strict=True)])
                            sign = np.array([-1.0 if k == "down" else 1.0 for k in kinds])
                            trial["plain"] = acc(plain_finetune(global_head, emb[ans], target, sign, **PLAIN))
                            trial["grid"] = [acc(plain_finetune(global_head, emb[ans], target, sign, **g))
                                             for g in GRID]
                            for name, over in policies.items():
                                state = Path(tmp) / "dev"
                                shutil.rmtree(state, ignore_errors=True)
                                dev = Device(state, model_files=model_files, train_policy=TrainPolicy(**over))
                                for k, i in zip(kinds, ans, strict=True):
                                    pid = f"{i}"
                                    probs = softmax(head_logits(global_head, emb[i][None])[0])[0]
                                    dev.store.add_prediction(prediction_id=pid, model_version=0,
                                                             label=labels[pred[i]], probs=probs, embedding=emb[i],
                                                             features=feats[i], latency_ms=0.0)
                                    dev.feedback(pid, k if k != "label" else labels[y[i]])
                                started = time.perf_counter()
                                report = dev.personalize()
                                trial[f"ms:{name}"] = 1000 * (time.perf_counter() - started)
                                trial[f"status:{name}"] = report.status
                                trial[f"guard:{name}"] = {k: report.to_dict()[k] for k in
                                                          ("reason", "score_before", "score_after", "guard",
                                                           "confirmed_flipped", "confirmed_flipped_fit",
                                                           "input_affine_score", "input_affine")}
                                if dev.input_affine is not None:  # what the device shows: the moved features
                                    shown = labels_with_input_affine(dev.model, feats[scored], dev.input_affine)
                                    trial[name] = float(np.mean(shown == y[scored]))
                                else:
                                    trial[name] = acc(dev.model.get_weights())
                                dev.store.close()
                            trials.append(trial)
                print(f"  {spk} done", flush=True)
    return {"model": str(args.model), "policies": policies, "answer_counts": answer_counts, "seed": args.seed,
            "orders": {"nemo": args.orders, "ravdess": args.ravdess_orders}, "plain": PLAIN, "grid": GRID,
            "trials": trials}


def _mse(values) -> tuple[float, float]:
    v = 100 * np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def summarise(result: dict) -> tuple[list[str], dict]:
    trials, policies = result["trials"], list(result["policies"])
    lines, curve = [], {}
    for corpus in dict.fromkeys(t["corpus"] for t in trials):
        for mode in dict.fromkeys(t["mode"] for t in trials):
            cell = [t for t in trials if t["corpus"] == corpus and t["mode"] == mode]
            if not cell:
                continue
            lines += ["", f"### {corpus}, answers with {mode}", "",
                      "| answers | trials | global acc. % | " + " | ".join(f"{p}: acc. % (gain)" for p in policies)
                      + " | plain fine-tune: acc. % (gain) | best plain in hindsight | "
                      + " | ".join(f"{p} - plain (paired)" for p in policies)
                      + " | worst run, " + policies[0] + " | runs below -5 | guard kept |",
                      "| --- " * (8 + 2 * len(policies)) + "|"]
            for n in sorted({t["answers"] for t in cell}):
                ts = [t for t in cell if t["answers"] == n]
                g = [t["global"] for t in ts]
                row = [str(n), str(len(ts)), "{:.1f} ± {:.1f}".format(*_mse(g))]
                for p in policies:
                    a, d = _mse([t[p] for t in ts]), _mse([t[p] - t["global"] for t in ts])
                    row.append(f"{a[0]:.1f} ± {a[1]:.1f} ({d[0]:+.1f} ± {d[1]:.1f})")
                    curve.setdefault((corpus, mode, p), []).append((n, *d))
                a, d = _mse([t["plain"] for t in ts]), _mse([t["plain"] - t["global"] for t in ts])
                curve.setdefault((corpus, mode, "plain fine-tune"), []).append((n, *d))
                row.append(f"{a[0]:.1f} ± {a[1]:.1f} ({d[0]:+.1f} ± {d[1]:.1f})")
                best = int(np.argmax(np.mean([t["grid"] for t in ts], axis=0)))
                a = _mse([t["grid"][best] for t in ts])
                cfg = result["grid"][best]
                row.append(f"{a[0]:.1f} ± {a[1]:.1f} (lr {cfg['lr']}, {cfg['steps']} steps)")
                for p in policies:
                    d = _mse([t[p] - t["plain"] for t in ts])
                    row.append(f"{d[0]:+.1f} ± {d[1]:.1f}")
                gains = 100 * np.array([t[policies[0]] - t["global"] for t in ts])
                row += [f"{gains.min():+.1f}", str(int(np.sum(gains < -5))),
                        f"{sum(t['status:' + policies[0]] == 'kept' for t in ts)}/{len(ts)}"]
                lines.append("| " + " | ".join(row) + " |")
            top = max(t["answers"] for t in cell)
            times = [f"{p} median {np.median([t['ms:' + p] for t in cell if t['answers'] == top]):.0f} ms, "
                     f"max {np.max([t['ms:' + p] for t in cell if t['answers'] == top]):.0f} ms" for p in policies]
            lines += ["", f"Time of one personalisation after {top} answers (this shared machine, wall clock): "
                      + "; ".join(times) + "."]
    return lines, curve


def write(out: Path, result: dict, lines: list[str], curve: dict, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    panels = sorted({(c, m) for c, m, _ in curve})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (corpus, mode) in zip(axes[0], panels, strict=True):
        for (c, m, name), points in curve.items():
            if (c, m) == (corpus, mode):
                n, mean, se = zip(*points, strict=True)
                ax.errorbar(n, mean, yerr=se, marker="o", capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{corpus}, {mode}", fontsize=9)
        ax.set_xlabel("answers")
        ax.set_ylabel("gain over global (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gain-vs-answers.png")
    plt.close(fig)
    pol = "; ".join(f"{k}: {v or 'TrainPolicy() as shipped'}" for k, v in result["policies"].items())
    head = ["# Personalisation study: users unlike the training set", "",
            f"`{command}`", "",
            f"Model: `{result['model']}`; seed {result['seed']}; orders per speaker {result['orders']}. "
            f"Policies: {pol}. Plain fine-tune: Adam {result['plain']} on the answers, no balancing, replay or "
            "guard. Accuracy on each user's later clips (the same clips for every method and answer count), in %, "
            "mean ± standard error over trials (speaker x order); gain = minus the global head's accuracy; "
            "'- plain' is the paired difference with the plain fine-tune. 'guard kept' counts trials where the "
            "SDK kept its update."]
    (out / "personalisation.md").write_text("\n".join(head + lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.personalisation_study", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="a .tflite beside its .json, or a folder with model.tflite and model.json")
    parser.add_argument("--corpora", default="nemo,ravdess", help=f"comma-separated, of {', '.join(CORPORA)}")
    parser.add_argument("--answers", default="5,10,20,40")
    parser.add_argument("--orders", type=int, default=5, help="answer orders per nEMO speaker")
    parser.add_argument("--ravdess-orders", type=int, default=10, help="answer orders per RAVDESS actor")
    parser.add_argument("--modes", default="corrections,thumbs", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--nemo-users", help="nEMO speakers, comma-separated (default the test speakers "
                        f"{','.join(NEMO_TEST)}; choose settings on others, e.g. EB0,KD0,KS0,MP0,SM0,WR0, with a "
                        "model they did not train: since stop 27 every one of them trains the bundled model, so use "
                        "a stand-in such as docs/results/personalisation-study/stop21/train_validation_bundled.py's)")
    parser.add_argument("--ravdess-users", help="RAVDESS actors, comma-separated (default the test actors 21-24; "
                        "choose settings on actors the model did not train on: 19,20 for the RAVDESS-only base; the "
                        "bundled model trains on 1-20 since stop 27, so a stand-in's held-out actors)")
    parser.add_argument("--policy", action="append", default=[], help="NAME=field:value,... a TrainPolicy variant")
    parser.add_argument("--skip-default", action="store_true", help="only the --policy variants (and the baselines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "personalisation-study")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for flag, given, known in (("--modes", args.modes, tuple(MODES)), ("--corpora", args.corpora, CORPORA)):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:  # a typo would run nothing (a mode) or the RAVDESS test actors (a corpus)
            parser.error(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
    result = run_study(args)
    lines, curve = summarise(result)
    print("\n".join(lines), flush=True)
    if args.out:
        write(args.out, result, lines, curve,
              "python -m tools.personalisation_study " + shlex.join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
