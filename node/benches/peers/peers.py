#!/usr/bin/env python3
"""The peers' half of the accuracy benchmark: SmartNoise SQL and OpenDP's Polars API.

    python peers.py --data FILE.csv --epsilon E --runs R --timing-runs T --seed S --out OUT.json

Run it with the venv made by venv.sh (beside this file), which pins both peers.

Data: a CSV with a header and columns person_id (string), imd_quintile (integer 1..5),
age (integer, 0..100). One row per person: the privacy unit is a person, who contributes
one row (contributions = 1).

For each peer, at the same TOTAL ε = E, pure ε-DP (δ = 0 wherever the peer allows it),
the keys imd_quintile 1..5 declared public (no thresholding or censoring of keys; group
sizes stay private), age clamped to [0, 100]:

(a) accuracy: the combined query
        SELECT imd_quintile, COUNT(*), SUM(age), AVG(age) ... GROUP BY imd_quintile
    run R times, fresh noise each time; RMSE against the exact (clamped, noise-free)
    values per aggregate, pooled over the 5 groups and the R runs; and the median wall
    time of one such query;
(b) speed: COUNT, SUM and AVG each alone, each at total ε = E, T times each: the median
    wall time of one query;
(c) privacy cost read back from the peer itself (SmartNoise's get_privacy_cost and its
    odometer; OpenDP's privacy map of the resolved measurement and its compositor),
    checked to equal E for every query.

What one timed query includes (the data is already in memory in both peers, and loading
it is never timed):
  * SmartNoise SQL: PrivateReader.execute(sql) on a reader over a PandasReader whose
    SQLite copy of the data was built once beforehand: parsing, the rewrite, the
    mechanisms' calibration (SmartNoise binary-searches each Laplace scale through
    OpenDP on every execute), SQLite's GROUP BY over all rows, noise, post-processing.
  * OpenDP Polars: Context.compositor over the in-memory LazyFrame (a fresh context
    holding exactly E per query; building it reads no rows), the query plan, resolve()
    (OpenDP's binary search for the noise scale that spends E), running the measurement
    on the data (Polars' group-by over all rows plus noise) and collect(). The split
    between calibration and execution is also reported ("breakdown_median_s").

The exact values are computed here with pandas from the same data, clamped to [0, 100].
Our RNG (NumPy's and Python's, used for nothing that touches the peers' noise) is seeded
with --seed; the peers draw their noise from their own secure RNG (OpenDP's, in both),
which cannot be seeded: the RMSE is statistical.

If either peer fails, the script exits non-zero naming it and writes no OUT file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from importlib.metadata import version

import numpy as np
import pandas as pd
import polars as pl

KEYS = [1, 2, 3, 4, 5]  # public keys of imd_quintile, in output order
LOWER, UPPER = 0, 100  # clamping bounds of age
AGGS = ("count", "sum", "avg")
# A read-back cost must equal E to this relative tolerance.
EPS_RTOL = 1e-9


def log(msg: str) -> None:
    print(f"peers.py: {msg}", file=sys.stderr, flush=True)


class PeerError(Exception):
    """A peer did not produce what the benchmark needs (wrong keys, wrong cost, ...)."""


# --------------------------------------------------------------------------- data


def load(path: str) -> pd.DataFrame:
    df = pd.read_csv(
        path,
        dtype={"person_id": "string", "imd_quintile": "int64", "age": "int64"},
        usecols=["person_id", "imd_quintile", "age"],
    )
    # pandas' "string" dtype is for reading; SmartNoise's SQLite copy wants plain objects.
    df["person_id"] = df["person_id"].astype(object)
    if df[["imd_quintile", "age"]].isna().any().any():
        raise SystemExit("peers.py: imd_quintile and age must never be null")
    bad = sorted(set(df["imd_quintile"].unique()) - set(KEYS))
    if bad:
        raise SystemExit(f"peers.py: imd_quintile outside 1..5: {bad[:10]}")
    missing = sorted(set(KEYS) - set(df["imd_quintile"].unique()))
    if missing:
        # AVG would be undefined and SmartNoise (which does not know the key set) would
        # drop the group: refuse rather than compare different outputs.
        raise SystemExit(f"peers.py: no rows for imd_quintile {missing}")
    return df


def truth(df: pd.DataFrame) -> dict[str, list[float]]:
    g = df.assign(age=df["age"].clip(LOWER, UPPER)).groupby("imd_quintile")["age"]
    count = g.size().reindex(KEYS)
    total = g.sum().reindex(KEYS)
    return {
        "count": [float(v) for v in count],
        "sum": [float(v) for v in total],
        "avg": [float(s) / float(c) for s, c in zip(total, count)],
    }


def rmse(released: list[list[float]], exact: list[float]) -> float:
    """RMSE pooled over every run and every group."""
    err = np.asarray(released, dtype=float) - np.asarray(exact, dtype=float)[None, :]
    return float(math.sqrt(np.mean(err * err)))


def check_eps(peer: str, what: str, got: float, e: float) -> None:
    if not math.isfinite(got) or abs(got - e) > EPS_RTOL * max(1.0, e):
        raise PeerError(f"{peer}: {what} reports ε = {got!r}, expected {e!r}")


# --------------------------------------------------------------------------- SmartNoise SQL

SN_TABLE = "bench.people"
# Output aliases (count, sum, avg are reserved words in SmartNoise's SQL grammar).
SN_ALIAS = {"count": "n", "sum": "s", "avg": "a"}
SN_SQL = {
    "combined": "SELECT imd_quintile, COUNT(*) AS n, SUM(age) AS s, AVG(age) AS a "
    f"FROM {SN_TABLE} GROUP BY imd_quintile",
    "count": f"SELECT imd_quintile, COUNT(*) AS n FROM {SN_TABLE} GROUP BY imd_quintile",
    "sum": f"SELECT imd_quintile, SUM(age) AS s FROM {SN_TABLE} GROUP BY imd_quintile",
    "avg": f"SELECT imd_quintile, AVG(age) AS a FROM {SN_TABLE} GROUP BY imd_quintile",
}


def sn_metadata() -> dict:
    # Collection "bench", schema "bench", table "people" (SQL: bench.people).
    #   row_privacy: every row is one person, so a row is the privacy unit (SmartNoise
    #     refuses row_privacy together with a private_id column, hence person_id is
    #     declared as a plain string; with row_privacy each row counts once: max_ids 1).
    #   censor_dims: False: the keys are public, no τ-thresholding (and so δ = 0).
    #   clamp_counts: negative noisy counts become 0 (post-processing).
    #   clamp_columns: age is clamped to [lower, upper] in the SQL it runs.
    #   use_dpsu: False: no DP set union for keys (it would spend ε).
    return {
        "bench": {
            "bench": {
                "people": {
                    "row_privacy": True,
                    "max_ids": 1,
                    "censor_dims": False,
                    "clamp_counts": True,
                    "clamp_columns": True,
                    "use_dpsu": False,
                    "person_id": {"type": "string"},
                    "imd_quintile": {"type": "int"},
                    "age": {"type": "int", "lower": LOWER, "upper": UPPER, "nullable": False},
                }
            }
        }
    }


def run_smartnoise(df: pd.DataFrame, e: float, runs: int, timing_runs: int) -> dict:
    import snsql
    from snsql.sql import PrivateReader
    from snsql.sql.reader.pandas import PandasReader

    meta = sn_metadata()
    t = time.perf_counter()
    # The data goes into SmartNoise's in-memory SQLite once; every PrivateReader below
    # (one per ε per mechanism) wraps this one copy. Not timed.
    base = PandasReader(df, meta)
    log(f"smartnoise-sql: data loaded into its SQLite in {time.perf_counter() - t:.1f}s")

    def reader(eps_mech: float) -> PrivateReader:
        # Privacy.epsilon is SmartNoise's ε for EACH noise mechanism of a query; δ = 0
        # (pure ε-DP: no censoring, Laplace noise only).
        return PrivateReader(base, meta, privacy=snsql.Privacy(epsilon=eps_mech, delta=0.0))

    def calibrate(sql: str) -> tuple[PrivateReader, float, tuple[float, float]]:
        """The per-mechanism ε whose reported total for `sql` is E, read back."""
        per_unit = float(reader(1.0).get_privacy_cost(sql)[0])  # = number of mechanisms
        eps_mech = e / per_unit
        r = reader(eps_mech)
        cost = r.get_privacy_cost(sql)
        if abs(float(cost[0]) - e) > EPS_RTOL * max(1.0, e):
            # Not linear (SmartNoise's odometer takes the min of basic and "optimal"
            # composition): bisect on the per-mechanism ε instead.
            lo, hi = 0.0, e
            for _ in range(200):
                mid = (lo + hi) / 2
                if float(reader(mid).get_privacy_cost(sql)[0]) > e:
                    hi = mid
                else:
                    lo = mid
            eps_mech = lo
            r = reader(eps_mech)
            cost = r.get_privacy_cost(sql)
        check_eps("smartnoise-sql", f"get_privacy_cost({sql!r})", float(cost[0]), e)
        return r, eps_mech, (float(cost[0]), float(cost[1]))

    def execute(r: PrivateReader, sql: str, cols: list[str]) -> tuple[dict[str, list[float]], float]:
        r.odometer.reset()
        t0 = time.perf_counter()
        rows = r.execute(sql)
        dt = time.perf_counter() - t0
        spent = float(r.odometer.spent[0])
        check_eps("smartnoise-sql", "the odometer after one query", spent, e)
        header, body = rows[0], rows[1:]
        by_key = {int(row[header.index("imd_quintile")]): row for row in body}
        if sorted(by_key) != KEYS or len(body) != len(KEYS):
            raise PeerError(f"smartnoise-sql: groups {sorted(by_key)}, expected {KEYS}")
        return {c: [float(by_key[k][header.index(SN_ALIAS[c])]) for k in KEYS] for c in cols}, dt

    # What SmartNoise does with each query: the rewritten inner query's noised columns and
    # the ε of each (read from the reader, to describe the split in the notes).
    def mechanisms(r: PrivateReader, sql: str) -> str:
        sub, _ = r._rewrite(sql)
        parts = []
        for s in sub._select_symbols:
            m = getattr(s, "mechanism", None)
            if m is not None:
                parts.append(f"{s.name}: ε {m.epsilon:.6g}, Laplace scale {m.scale:.6g}")
        return "; ".join(parts)

    rd, eps_mech, cost = calibrate(SN_SQL["combined"])
    notes = [
        f"combined query: {mechanisms(rd, SN_SQL['combined'])} "
        f"(per-mechanism ε = E/{e / eps_mech:.6g}; get_privacy_cost = {cost[0]:.12g}). "
        "AVG(age) is rewritten to noisy SUM(age) / noisy COUNT(age): it reuses SUM's noisy "
        "value and adds its own COUNT(age), separate from COUNT(*)."
    ]

    released = {a: [] for a in AGGS}
    times = []
    log(f"smartnoise-sql: {runs} runs of the combined query")
    for i in range(runs):
        vals, dt = execute(rd, SN_SQL["combined"], list(AGGS))
        times.append(dt)
        for a in AGGS:
            released[a].append(vals[a])

    alone = {}
    eps_alone = {}
    for a in AGGS:
        ra, em, ca = calibrate(SN_SQL[a])
        eps_alone[a] = ca[0]
        notes.append(f"{a.upper()} alone: {mechanisms(ra, SN_SQL[a])} (get_privacy_cost = {ca[0]:.12g}).")
        ts = [execute(ra, SN_SQL[a], [a])[1] for _ in range(timing_runs)]
        alone[a] = statistics.median(ts)
        log(f"smartnoise-sql: {a} alone, median {alone[a]:.3f}s")
    notes.append(
        "Every mechanism is SmartNoise's Laplace class (OpenDP's float Laplace, "
        "'floating-point' feature, which SmartNoise enables itself); integer outputs "
        "(COUNT, SUM of an int column) are then truncated to int. δ: SmartNoise's odometer "
        "reports a residual 1e-15-order δ (its composition tolerance) even with δ = 0 and no "
        "censoring; no mechanism uses δ."
    )
    return {
        "name": "smartnoise-sql",
        "version": version("smartnoise-sql"),
        "epsilon_reported": cost[0],
        "delta_reported": cost[1],
        "epsilon_reported_per_query": {"combined": cost[0], **eps_alone},
        "rmse": None,  # filled by the caller
        "combined_median_s": statistics.median(times),
        "median_s": alone,
        "notes": " ".join(notes),
        "_released": released,
    }


# --------------------------------------------------------------------------- OpenDP Polars


def run_opendp(df: pd.DataFrame, e: float, runs: int, timing_runs: int) -> dict:
    import opendp.prelude as dp
    from opendp.mod import GLOBAL_FEATURES

    # "contrib" is needed for every OpenDP constructor not yet vetted (the Polars API
    # included). Nothing else: ints are noised with OpenDP's integer Laplace, so
    # "floating-point" is not needed, and "honest-but-curious" is not needed either.
    # SmartNoise (same process, same OpenDP) enables "floating-point" for its own
    # float Laplace; switch it off again so this peer runs with exactly "contrib".
    dp.disable_features("floating-point", "honest-but-curious")
    dp.enable_features("contrib")

    lf = pl.from_pandas(df).lazy()  # in memory; built once, not timed
    n = len(df)
    # Margin over imd_quintile: invariant="keys" declares the keys public (no
    # thresholding); the group sizes stay private. max_length is only an upper bound on any
    # group's size, which OpenDP requires for integer sums (its overflow analysis); the
    # number of rows n is trivially one. No max_groups: contributions = 1 already bounds
    # a person to one group.
    margin = dp.polars.Margin(by=["imd_quintile"], invariant="keys", max_length=n)
    bounds = (LOWER, UPPER)
    exprs = {
        "count": lambda: dp.len().alias("count"),
        # .dp.sum / .dp.mean clip age to bounds themselves.
        "sum": lambda: pl.col("age").dp.sum(bounds).alias("sum"),
        "avg": lambda: pl.col("age").dp.mean(bounds).alias("avg"),
    }
    queries = {"combined": list(AGGS), "count": ["count"], "sum": ["sum"], "avg": ["avg"]}

    def context():
        # A fresh compositor holding exactly E for one query.
        return dp.Context.compositor(
            data=lf,
            privacy_unit=dp.unit_of(contributions=1),
            privacy_loss=dp.loss_of(epsilon=e),  # pure ε-DP: MaxDivergence, no δ
            split_evenly_over=1,
            margins=[margin],
        )

    def build(ctx, cols):
        return ctx.query().group_by("imd_quintile").agg(*[exprs[c]() for c in cols])

    def execute(cols: list[str]):
        t0 = time.perf_counter()
        ctx = context()
        q = build(ctx, cols)
        m = q.resolve()  # what q.release() does: calibrate, then run it in the context
        t1 = time.perf_counter()
        out = ctx(m).collect()
        t2 = time.perf_counter()
        if GLOBAL_FEATURES != {"contrib"}:
            raise PeerError(f"opendp-polars: features {sorted(GLOBAL_FEATURES)}, expected contrib")
        # Read back the loss: the measurement's own privacy map at d_in = 1, and what
        # the compositor charged.
        eps_m = float(m.map(1))
        if not (eps_m <= e * (1 + EPS_RTOL) and eps_m >= e * (1 - 1e-6)):
            raise PeerError(f"opendp-polars: measurement's privacy map gives ε = {eps_m!r}, expected {e!r}")
        charged = ctx.current_privacy_loss()
        if len(charged) != 1:
            raise PeerError(f"opendp-polars: compositor charged {charged!r}")
        check_eps("opendp-polars", "the compositor", float(charged[0]), e)
        out = out.sort("imd_quintile")
        keys = out["imd_quintile"].to_list()
        if keys != KEYS:
            raise PeerError(f"opendp-polars: groups {keys}, expected {KEYS}")
        vals = {c: [float(v) for v in out[c].to_list()] for c in cols}
        return vals, t2 - t0, t1 - t0, t2 - t1, eps_m, q

    def split(q) -> str:
        # OpenDP's own summary of the mechanisms; ε per mechanism = sensitivity / scale,
        # with sensitivity 1 for a length and UPPER for a sum (contributions = 1).
        s = q.summarize()
        parts = []
        for row in s.iter_rows(named=True):
            sens = UPPER if row["aggregate"] == "Sum" else 1
            parts.append(
                f"{row['column']} {row['aggregate']}: {row['distribution']} scale "
                f"{row['scale']:.6g} (ε {sens / row['scale']:.6g})"
            )
        return "; ".join(parts)

    released = {a: [] for a in AGGS}
    times, t_cal, t_run = [], [], []
    log(f"opendp-polars: {runs} runs of the combined query")
    eps_comb, q_comb = None, None
    for i in range(runs):
        vals, dt, dc, dr, eps_comb, q_comb = execute(list(AGGS))
        times.append(dt)
        t_cal.append(dc)
        t_run.append(dr)
        for a in AGGS:
            released[a].append(vals[a])
    notes = [
        f"combined query: {split(q_comb)} (measurement's map(1) = {eps_comb:.12g}). "
        "OpenDP searches one global scale for the whole query, so every noise mechanism "
        "gets an equal share of ε; .dp.mean is its own noisy Sum / noisy Length (group "
        "lengths are private under invariant='keys'), so it shares nothing with the len "
        "or the sum beside it."
    ]
    alone, eps_alone = {}, {}
    for a in AGGS:
        ts = []
        for _ in range(timing_runs):
            _, dt, _, _, eps_a, q_a = execute(queries[a])
            ts.append(dt)
        alone[a] = statistics.median(ts)
        eps_alone[a] = eps_a
        notes.append(f"{a.upper()} alone: {split(q_a)} (map(1) = {eps_a:.12g}).")
        log(f"opendp-polars: {a} alone, median {alone[a]:.3f}s")
    notes.append(
        f"Features enabled: contrib only. Keys public via Margin(invariant='keys'), "
        f"max_length = n = {n} (an upper bound only). polars {version('polars')}. "
        "Counts and integer sums use OpenDP's integer (discrete) Laplace; the measure is "
        "MaxDivergence (pure ε), so δ is 0 by construction."
    )
    return {
        "name": "opendp-polars",
        "version": version("opendp"),
        "epsilon_reported": eps_comb,
        "delta_reported": 0.0,
        "epsilon_reported_per_query": {"combined": eps_comb, **eps_alone},
        "rmse": None,
        "combined_median_s": statistics.median(times),
        "breakdown_median_s": {
            "calibrate": statistics.median(t_cal),  # context, plan, resolve()
            "execute": statistics.median(t_run),  # measurement on the data + collect()
        },
        "median_s": alone,
        "notes": " ".join(notes),
        "_released": released,
    }


# --------------------------------------------------------------------------- main

PEERS = [("smartnoise-sql", run_smartnoise), ("opendp-polars", run_opendp)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CSV: person_id, imd_quintile, age")
    ap.add_argument("--epsilon", type=float, required=True, help="total ε of each query")
    ap.add_argument("--runs", type=int, required=True, help="runs of the combined query (accuracy)")
    ap.add_argument("--timing-runs", type=int, required=True, help="runs of each aggregate alone (speed)")
    ap.add_argument("--seed", type=int, required=True, help="seed of our own RNG (not the peers' noise)")
    ap.add_argument("--out", required=True, help="JSON output")
    args = ap.parse_args()
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        ap.error("--epsilon must be positive and finite")
    if args.runs < 1 or args.timing_runs < 1:
        ap.error("--runs and --timing-runs must be at least 1")

    random.seed(args.seed)
    np.random.seed(args.seed)  # SmartNoise draws its column-alias prefix from NumPy

    t_all = time.perf_counter()
    df = load(args.data)
    exact = truth(df)
    log(f"{len(df)} rows loaded; ε = {args.epsilon}, R = {args.runs}, T = {args.timing_runs}")

    peers, failed = [], []
    for name, fn in PEERS:
        t = time.perf_counter()
        try:
            res = fn(df, args.epsilon, args.runs, args.timing_runs)
        except Exception:
            log(f"peer {name} FAILED:\n{traceback.format_exc()}")
            failed.append(name)
            continue
        released = res.pop("_released")
        res["rmse"] = {a: rmse(released[a], exact[a]) for a in AGGS}
        log(f"{name}: done in {time.perf_counter() - t:.1f}s, rmse {res['rmse']}")
        peers.append(res)
    if failed:
        log(f"failed peers: {', '.join(failed)}; no output written")
        return 1

    result = {
        "epsilon": args.epsilon,
        "runs": args.runs,
        "timing_runs": args.timing_runs,
        "seed": args.seed,
        "rows": len(df),
        "truth": exact,
        "peers": peers,
        "wall_s": time.perf_counter() - t_all,
    }
    # Write atomically: a consumer never sees a partial file.
    out_dir = os.path.dirname(os.path.abspath(args.out))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".peers-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, args.out)
    log(f"wrote {args.out} in {result['wall_s']:.1f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
