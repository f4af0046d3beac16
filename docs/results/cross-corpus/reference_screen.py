"""Screen of the speaker-normalisation reference (and a few recipe changes) for the RAVDESS-only CNN on nEMO.

    .venv/bin/python docs/results/cross-corpus/reference_screen.py NAME 'JSON VARIANT' 0,1,2

Features (log-mel, level-normalised) are loaded once from the cache of `models.cross_corpus`; a plain Keras loop
mirrors `models.train.train_baseline` (class-weighted loss, Adam 1e-3, batch 32, <= 40 epochs, patience 10, best
epoch by validation UAR). RAVDESS actors 1-18 train, 19-20 validate; tested on RAVDESS 21-24 and all of nEMO.
VARIANT keys: utt ("level" or "mean"), ref (whose frames make a training/validation speaker's statistics:
"4class" = all their four-class clips, as before; "neutral" = neutral + calm; "neutral-only"; "all8" = every
RAVDESS emotion; "4class-bal"; "4class+calm"), refaug (Dirichlet concentration: a random class mix as the reference each
epoch), ls, mixup. Test speakers' statistics always come from all their (four-class) clips. "_pc" figures: after
a per-speaker prior correction (class biases making the speaker's mean predicted probabilities equal; no label).
One JSON line per run is appended to screen.jsonl beside this file.
"""

import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
from edge_sdk.features import FeatureConfig, Normalization, SpeakerStats, fit_frames
from models.architectures import build_encoder, build_head, preset
from models.datasets import LabelMap, default_nemo_root, default_ravdess_root, load_corpus
from models.features import compute_features
from models.metrics import classification_report

LAB = ("angry", "happy", "neutral", "sad")
ALL = LAB + ("calm", "fearful", "disgust", "surprised")
cfg = FeatureConfig(kind="logmel", speaker_norm=True, utterance_norm="level")
R = N = TRAIN = VAL = RTEST = None


def unpack(fs):
    return [dict(spk=c.speaker, lab=c.label, x=x) for c, x in zip(fs.clips, fs.raw, strict=True)]


def actor(d):
    return int(d["spk"].split("-")[1])


def load():
    """The cached level-normalised log-mel features of every RAVDESS clip (all 8 emotions) and of nEMO."""
    global R, N, TRAIN, VAL, RTEST
    if default_ravdess_root() is None or default_nemo_root() is None:
        raise SystemExit("needs ../shared/data/ravdess and ../shared/data/nemo (or $FEDSER_RAVDESS, $FEDSER_NEMO)")
    r = load_corpus("ravdess", default_ravdess_root(), LabelMap(classes=ALL))
    n = load_corpus("nemo", default_nemo_root())
    R = unpack(compute_features(r, cfg, cache_dir=".cache/features"))
    N = unpack(compute_features(n, cfg, cache_dir=".cache/features"))
    TRAIN = [d for d in R if actor(d) <= 18]
    VAL = [d for d in R if actor(d) in (19, 20)]
    RTEST = [d for d in R if actor(d) >= 21]


def uttnorm(x, mode):
    if mode == "level":
        return x
    if mode == "mean":
        return x - x.mean(0, keepdims=True)
    raise ValueError(mode)


def inputs(items, ref, norm, V, calm_neutral=False):
    """items: clips to build; ref: per speaker, the clips whose frames make the speaker stats."""
    out = []
    stats = {}
    for d in ref:
        s = stats.setdefault(d["spk"], SpeakerStats(40))
        s.add(uttnorm(d["x"], V["utt"]))
    nn = {k: s.normalization(norm) for k, s in stats.items()}
    for d in items:
        out.append(fit_frames(nn[d["spk"]].apply(uttnorm(d["x"], V["utt"])), 300))
    return np.stack(out)


def labels_of(items, calm=False):
    return np.array([LAB.index("neutral" if (calm and d["lab"] == "calm") else d["lab"]) for d in items])


def four(items, calm=False):
    return [d for d in items if d["lab"] in LAB or (calm and d["lab"] == "calm")]


def ref_clips(items, mode):
    if mode == "4class":
        return four(items)
    if mode == "all8":
        return items
    if mode == "neutral":
        return [d for d in items if d["lab"] in ("neutral", "calm")]
    if mode == "neutral-only":
        return [d for d in items if d["lab"] == "neutral"]
    if mode == "4class-bal":
        return four(items) + [d for d in items if d["lab"] == "neutral"]
    if mode == "4class+calm":
        return four(items) + [d for d in items if d["lab"] == "calm"]
    if mode == "neutral+4class":
        return four(items) + [d for d in items if d["lab"] in ("neutral", "calm")] * 2
    if mode == "lowarousal":
        return [d for d in items if d["lab"] in ("neutral", "calm", "sad")]
    raise ValueError(mode)


def prior_correct(z):
    z = z.astype(np.float64)
    b = np.zeros(z.shape[1])
    for _ in range(50):
        p = np.exp(z + b - (z + b).max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        b -= np.log(p.mean(0) * z.shape[1])
    return np.argmax(z + b, 1)


def run(V, seed):
    import keras

    keras.utils.set_random_seed(seed)
    calm = V.get("calm", False)
    tr = four(TRAIN, calm)
    va = four(VAL, calm)

    def utt(items):
        return [uttnorm(d["x"], V["utt"]) for d in items]

    norm = Normalization.fit(np.concatenate(utt(tr)))
    xtr = inputs(tr, ref_clips(TRAIN, V["ref"]), norm, V)
    ytr = labels_of(tr, calm)
    xva = inputs(va, ref_clips(VAL, V["ref"]), norm, V)
    yva = labels_of(va, calm)
    rt = four(RTEST)
    xrt = inputs(rt, ref_clips(RTEST, V.get("test_ref_r", "4class")), norm, V)
    yrt = labels_of(rt)
    xn = inputs(N, N, norm, V)
    yn = labels_of(N)
    arch = preset("cnn", **V.get("arch", {}))
    enc = build_encoder(arch, 300, 40)
    head = build_head(arch, 4)
    inp = keras.Input((300, 40))
    model = keras.Model(inp, head(enc(inp)))
    model.compile(
        keras.optimizers.Adam(V.get("lr", 1e-3)),
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=V.get("ls", 0.0)),
    )
    counts = np.bincount(ytr, minlength=4).astype(float)
    cw = counts.sum() / (4 * counts)
    oh = np.eye(4, dtype=np.float32)[ytr]
    best, bw, wait = -1, None, 0
    rng = np.random.default_rng(seed)
    if V.get("refaug"):
        ux = [uttnorm(d["x"], V["utt"]).astype(np.float64) for d in tr]
        csum = np.stack([u.sum(0) for u in ux])
        csq = np.stack([(u * u).sum(0) for u in ux])
        ccount = np.array([len(u) for u in ux], float)
        spk_tr = np.array([d["spk"] for d in tr])
        mu0 = np.array(norm.mean)
        sd0 = np.array(norm.std)
    epochs_run = 0
    for _ep in range(V.get("epochs", 40)):
        epochs_run += 1
        if V.get("refaug"):
            xtr = np.empty_like(xtr)
            for s in set(spk_tr):
                idx = np.flatnonzero(spk_tr == s)
                ys = ytr[idx]
                wc = rng.dirichlet([V["refaug"]] * 4)
                w = np.array([wc[c] / np.sum(ys == c) for c in ys])
                w = w / w.sum() * len(idx)
                cnt = (w * ccount[idx]).sum()
                n0 = 500
                m = ((w[:, None] * csum[idx]).sum(0) + n0 * mu0) / (cnt + n0)
                sec = ((w[:, None] * csq[idx]).sum(0) + n0 * (sd0**2 + mu0**2)) / (cnt + n0)
                sd = np.sqrt(np.maximum(sec - m * m, 1e-12))
                for i in idx:
                    xtr[i] = fit_frames(((ux[i] - m) / sd).astype(np.float32), 300)
        if V.get("mixup"):
            perm = rng.permutation(len(xtr))
            lam = rng.beta(V["mixup"], V["mixup"], len(xtr)).astype(np.float32)
            xb = lam[:, None, None] * xtr + (1 - lam[:, None, None]) * xtr[perm]
            yb = lam[:, None] * oh + (1 - lam[:, None]) * oh[perm]
            sw = lam * cw[ytr] + (1 - lam) * cw[ytr[perm]]
            model.fit(xb, yb, batch_size=32, epochs=1, verbose=0, sample_weight=sw.astype(np.float32), shuffle=True)
        else:
            model.fit(
                xtr,
                oh,
                batch_size=32,
                epochs=1,
                verbose=0,
                class_weight={i: float(w) for i, w in enumerate(cw)},
                shuffle=True,
            )
        u = classification_report(yva, np.argmax(model.predict(xva, batch_size=256, verbose=0), 1), LAB)["uar"]
        if u > best:
            best, bw, wait = u, model.get_weights(), 0
        else:
            wait += 1
            if wait >= V.get("patience", 10):
                break
    model.set_weights(bw)
    out = {"seed": seed, "epochs": epochs_run, "val": float(best)}
    for name, x, y, items in (("ravdess", xrt, yrt, rt), ("nemo", xn, yn, N)):
        z = model.predict(x, batch_size=256, verbose=0)
        rep = classification_report(y, np.argmax(z, 1), LAB)
        out[name] = float(rep["uar"])
        out[name + "_rec"] = [round(float(rep["per_class"][lab]["recall"]), 3) for lab in LAB]
        spk = np.array([d["spk"] for d in items])
        pc = np.zeros(len(y), int)
        for s in set(spk):
            pc[spk == s] = prior_correct(z[spk == s])
        rep2 = classification_report(y, pc, LAB)
        out[name + "_pc"] = float(rep2["uar"])
        out[name + "_pc_rec"] = [round(float(rep2["per_class"][lab]["recall"]), 3) for lab in LAB]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[name + "_mp"] = [round(float(v), 3) for v in p.mean(0)]
    return out


def table(path) -> str:
    """Markdown: one row per variant, mean ± SE over its seeds."""
    rows = [json.loads(line) for line in open(path) if line.strip()]

    def f(v):
        v = np.asarray(v, float)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        return f"{v.mean():.3f} ± {se:.3f}" if len(v) > 1 else f"{v.mean():.3f}"

    out = [
        "| variant | seeds | RAVDESS 21-24 UAR | nEMO UAR | nEMO recall angry / happy / neutral / sad (means) "
        "| RAVDESS 21-24 UAR, prior-corrected | nEMO UAR, prior-corrected | nEMO recall after it (means) |",
        "| --- " * 8 + "|",
    ]
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        rec = " / ".join(f"{v:.2f}" for v in np.mean([r["nemo_rec"] for r in rs], 0))
        rec_pc = " / ".join(f"{v:.2f}" for v in np.mean([r["nemo_pc_rec"] for r in rs], 0))
        out.append(
            f"| {name} `{json.dumps(rs[0]['V'])}` | {','.join(str(r['seed']) for r in rs)} "
            f"| {f([r['ravdess'] for r in rs])} | {f([r['nemo'] for r in rs])} | {rec} "
            f"| {f([r['ravdess_pc'] for r in rs])} | {f([r['nemo_pc'] for r in rs])} | {rec_pc} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__" and sys.argv[1] == "table":
    print(table(os.path.join(os.path.dirname(os.path.abspath(__file__)), "screen.jsonl")))
elif __name__ == "__main__":
    load()
    name = sys.argv[1]
    V = json.loads(sys.argv[2])
    seeds = [int(s) for s in sys.argv[3].split(",")]
    for s in seeds:
        t = time.time()
        o = run(V, s)
        o.update(name=name, V=V, sec=round(time.time() - t))
        print(json.dumps(o), flush=True)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "screen.jsonl"), "a") as f:
            f.write(json.dumps(o) + "\n")
