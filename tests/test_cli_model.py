"""``edgeloop model build | inspect | predict``, through the real ``main()`` (and the console script)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers_models import export, fit_quietly, regression_data
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LinearRegression

from edgeloop.cli import main

EDGELOOP = Path(sys.executable).parent / "edgeloop"
FEATS = ",".join(f"x{i}" for i in range(8))


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(monkeypatch, capsys):
    def run(*args: str, stdin: str | None = None) -> Result:
        monkeypatch.setattr(sys, "argv", ["edgeloop", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, a fitted LinearRegression and GBR exported to ONNX, and some rows to predict."""
    tmp = tmp_path_factory.mktemp("cli")
    from runtime.artifacts import generate_keypair

    key, pub = generate_keypair(tmp / "keys")
    _, other_pub = generate_keypair(tmp / "other")
    X, y = regression_data(n=200)
    lr = fit_quietly(LinearRegression(), X, y)
    gbr = fit_quietly(GradientBoostingRegressor(n_estimators=20, random_state=0), X, y)
    (tmp / "lr.onnx").write_bytes(export(lr, X, np.float32))
    (tmp / "gbr.onnx").write_bytes(export(gbr, X, np.float32))
    (tmp / "coef.json").write_text(json.dumps({"weights": lr.coef_.tolist(), "intercept": float(lr.intercept_)}))
    return {"tmp": tmp, "key": key, "pub": pub, "other_pub": other_pub, "X": X, "lr": lr, "gbr": gbr}


def write_csv(path: Path, X: np.ndarray, extra: bool = True) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["id", *[f"x{i}" for i in range(X.shape[1])], "note"] if extra else [f"x{i}" for i in range(X.shape[1])]
        )
        for i, row in enumerate(X):
            w.writerow(
                [f"r{i}", *[repr(float(v)) for v in row], "hello, world"] if extra else [repr(float(v)) for v in row]
            )
    return path


def build(cli, world, out: Path, *extra: str, source: tuple[str, str] | None = None) -> Result:
    src = source or ("--coef", str(world["tmp"] / "coef.json"))
    return cli(
        "model",
        "build",
        *src,
        "--name",
        "m",
        "--version",
        "3",
        "--features",
        FEATS,
        "--key",
        world["key"],
        "--out",
        out,
        *extra,
    )


def test_build_inspect_predict_linear_coefficients(cli, world, tmp_path):
    r = build(cli, world, tmp_path / "b")
    assert r.code == 0, r.err
    assert "backend    numpy" in r.out
    r = cli("model", "inspect", tmp_path / "b", "--public-key", world["pub"])
    assert r.code == 0, r.err
    assert "signature     ok" in r.out and "backend       numpy" in r.out and "m v3" in r.out
    r = cli("model", "inspect", tmp_path / "b", "--public-key", world["pub"], "--json")
    info = json.loads(r.out)
    assert info["ok"] and info["signature"]["ok"] and info["artifact"] is None
    assert info["manifest"]["kind"] == "linear" and info["backend"] == "numpy"

    X = world["X"][:25]
    write_csv(tmp_path / "in.csv", X)
    r = cli(
        "model",
        "predict",
        tmp_path / "b",
        "--public-key",
        world["pub"],
        "--input",
        tmp_path / "in.csv",
        "--output",
        tmp_path / "out.csv",
    )
    assert r.code == 0, r.err
    assert "25 rows predicted" in r.err
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", *[f"x{i}" for i in range(8)], "note", "y_pred"]
    assert rows[3]["id"] == "r3" and rows[3]["note"] == "hello, world"
    np.testing.assert_allclose([float(r["y_pred"]) for r in rows], world["lr"].predict(X), rtol=1e-12)


def test_onnx_linear_is_compiled_and_gbr_runs_on_onnxruntime(cli, world, tmp_path):
    r = build(cli, world, tmp_path / "lr", source=("--onnx", str(world["tmp"] / "lr.onnx")))
    assert r.code == 0, r.err
    assert "backend    numpy (compiled from ai.onnx.ml.LinearRegressor)" in r.out
    assert "compiled weights agree with onnxruntime" in r.out
    r = cli("model", "inspect", tmp_path / "lr", "--public-key", world["pub"])
    assert r.code == 0 and "hash          ok" in r.out
    assert "backend       numpy (compiled from ai.onnx.ml.LinearRegressor)" in r.out

    r = build(cli, world, tmp_path / "gbr", source=("--onnx", str(world["tmp"] / "gbr.onnx")))
    assert r.code == 0, r.err
    r = cli("model", "inspect", tmp_path / "gbr", "--public-key", world["pub"], "--json")
    assert json.loads(r.out)["backend"] == "onnxruntime"

    X = world["X"][:10]
    lines = "".join(
        json.dumps({"id": i, **{f"x{j}": float(v) for j, v in enumerate(row)}}) + "\n" for i, row in enumerate(X)
    )
    r = cli("model", "predict", tmp_path / "gbr", "--public-key", world["pub"], "--input", "-", stdin=lines)
    assert r.code == 0, r.err
    out = [json.loads(line) for line in r.out.splitlines()]
    assert [o["id"] for o in out] == list(range(10))
    np.testing.assert_allclose([o["y_pred"] for o in out], world["gbr"].predict(X.astype(np.float32)), rtol=1e-5)


def test_tampered_bundles_are_refused(cli, world, tmp_path):
    assert build(cli, world, tmp_path / "onnx", source=("--onnx", str(world["tmp"] / "lr.onnx"))).code == 0
    raw = bytearray((tmp_path / "onnx" / "model.onnx").read_bytes())
    raw[len(raw) // 3] ^= 0x04
    (tmp_path / "onnx" / "model.onnx").write_bytes(bytes(raw))
    write_csv(tmp_path / "in.csv", world["X"][:3])

    r = cli("model", "inspect", tmp_path / "onnx", "--public-key", world["pub"])
    assert r.code == 1
    assert "signature     ok" in r.out and "hash          FAILED" in r.out
    assert "not loaded: verification failed" in r.out
    assert r.err.startswith("error: artifact sha256")
    r = cli("model", "predict", tmp_path / "onnx", "--public-key", world["pub"], "--input", tmp_path / "in.csv")
    assert r.code == 1 and r.err.startswith("error: ") and "sha256" in r.err and r.out == ""

    assert build(cli, world, tmp_path / "lin").code == 0
    mpath = tmp_path / "lin" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["weights"][0] += 1e-9
    mpath.write_text(json.dumps(m))
    r = cli("model", "inspect", tmp_path / "lin", "--public-key", world["pub"], "--json")
    assert r.code == 1
    assert json.loads(r.out)["signature"]["ok"] is False
    r = cli("model", "predict", tmp_path / "lin", "--public-key", world["pub"], "--input", tmp_path / "in.csv")
    assert r.code == 1 and "does not verify" in r.err

    assert build(cli, world, tmp_path / "ok").code == 0
    r = cli("model", "inspect", tmp_path / "ok", "--public-key", world["other_pub"])
    assert r.code == 1 and "signature     FAILED" in r.out


def test_predict_input_errors(cli, world, tmp_path):
    assert build(cli, world, tmp_path / "b").code == 0
    pub = world["pub"]
    header = FEATS
    r = cli("model", "predict", tmp_path / "b", "--public-key", pub, "--input", "-", stdin="x0,x1,x2\n1,2,3\n")
    assert r.code == 1
    assert "no column for features ['x3', 'x4', 'x5', 'x6', 'x7']" in r.err

    rows = ["1,2,3,4,5,6,7,8", "1,2,3,oops,5,6,7,8"]
    r = cli(
        "model", "predict", tmp_path / "b", "--public-key", pub, "--input", "-", stdin="\n".join([header, *rows]) + "\n"
    )
    assert r.code == 1
    assert r.err.strip() == "error: row 1, column 'x3': 'oops' is not a number (input line 3)"

    rows = ["1,2,3,4,5,6,7,8", "1,2,3,4,5,6,7,8", "1,2,,4,5,6,7,8"]
    r = cli(
        "model", "predict", tmp_path / "b", "--public-key", pub, "--input", "-", stdin="\n".join([header, *rows]) + "\n"
    )
    assert r.code == 1
    assert "row 2, column 'x2': value is NaN (missing)" in r.err and "input line 4" in r.err

    r = cli("model", "predict", tmp_path / "b", "--public-key", pub, "--input", "-", stdin='{"x0": 1}\n')
    assert r.code == 1 and "features ['x1'" in r.err and "input line 1" in r.err

    r = cli(
        "model",
        "predict",
        tmp_path / "b",
        "--public-key",
        pub,
        "--input",
        "-",
        stdin='{"x0": "1", "x1": 1, "x2": 1, "x3": 1, "x4": 1, "x5": 1, "x6": 1, "x7": 1}\n',
    )
    assert r.code == 1 and "row 0, column 'x0': \"1\" is not a number" in r.err

    r = cli("model", "predict", tmp_path / "b", "--public-key", pub, "--input", tmp_path / "missing.csv")
    assert r.code == 2 and "cannot read" in r.err


def test_impute_policy_through_the_cli(cli, world, tmp_path):
    mean = world["X"].mean(axis=0)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": mean.tolist(), "std": world["X"].std(axis=0).tolist()}))
    r = build(cli, world, tmp_path / "b", "--nan-policy", "impute", "--feature-stats", stats)
    assert r.code == 0, r.err
    row = world["X"][0].copy()
    text = FEATS + "\n" + ",".join("" if j == 5 else repr(float(v)) for j, v in enumerate(row)) + "\n"
    r = cli(
        "model", "predict", tmp_path / "b", "--public-key", world["pub"], "--input", "-", "--format", "csv", stdin=text
    )
    assert r.code == 0, r.err
    filled = row.copy()
    filled[5] = mean[5]
    got = float(next(iter(csv.DictReader(io.StringIO(r.out))))["y_pred"])
    assert got == pytest.approx(float(world["lr"].predict(filled[None, :])[0]), rel=1e-12)


def test_build_argument_errors(cli, world, tmp_path):
    r = cli(
        "model",
        "build",
        "--name",
        "m",
        "--version",
        "1",
        "--features",
        "a",
        "--key",
        world["key"],
        "--out",
        tmp_path / "x",
    )
    assert r.code == 2 and "exactly one of --onnx FILE or --coef FILE" in r.err
    r = build(cli, world, tmp_path / "x", "--dtype", "float64", source=("--onnx", str(world["tmp"] / "lr.onnx")))
    assert r.code == 2 and "input is float32, not float64" in r.err
    r = cli(
        "model",
        "build",
        "--onnx",
        world["tmp"] / "lr.onnx",
        "--name",
        "m",
        "--version",
        "1",
        "--features",
        "a,b,c",
        "--key",
        world["key"],
        "--out",
        tmp_path / "x",
    )
    assert r.code == 1 and r.err.startswith("error: ") and "8 wide but 3 features were given" in r.err
    r = cli(
        "model",
        "build",
        "--coef",
        world["tmp"] / "coef.json",
        "--name",
        "m",
        "--version",
        "1",
        "--features",
        "a,b",
        "--key",
        world["key"],
        "--out",
        tmp_path / "x",
    )
    assert r.code == 2 and "8 weights for 2 features" in r.err
    r = build(cli, world, tmp_path / "x", "--nan-policy", "impute")
    assert r.code == 2 and "needs --feature-stats" in r.err
    r = cli(
        "model",
        "build",
        "--coef",
        world["tmp"] / "coef.json",
        "--name",
        "m",
        "--version",
        "1",
        "--features",
        "a,,b",
        "--key",
        world["key"],
        "--out",
        tmp_path / "x",
    )
    assert r.code == 2 and "--features" in r.err
    r = cli(
        "model",
        "build",
        "--coef",
        world["tmp"] / "coef.json",
        "--name",
        "bad name!",
        "--version",
        "1",
        "--features",
        FEATS,
        "--key",
        world["key"],
        "--out",
        tmp_path / "x",
    )
    assert r.code == 2 and "name" in r.err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not a protobuf")
    r = build(cli, world, tmp_path / "x", source=("--onnx", str(bad)))
    assert r.code == 1 and "not a valid ONNX model" in r.err
    assert not (tmp_path / "x" / "manifest.json").exists()

    assert build(cli, world, tmp_path / "twice").code == 0
    r = build(cli, world, tmp_path / "twice")
    assert r.code == 2 and "--force" in r.err
    assert build(cli, world, tmp_path / "twice", "--force").code == 0

    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(world["key"]).read_bytes())
    os.chmod(loose, 0o644)
    r = cli(
        "model",
        "build",
        "--coef",
        world["tmp"] / "coef.json",
        "--name",
        "m",
        "--version",
        "1",
        "--features",
        FEATS,
        "--key",
        loose,
        "--out",
        tmp_path / "y",
    )
    assert r.code == 1 and "readable by others" in r.err


def test_console_script_prints_errors_not_tracebacks(world, tmp_path):
    """The installed `edgeloop` command, with a bundle refused and a table piped through stdin."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    args = [str(EDGELOOP), "model", "build", "--coef", str(world["tmp"] / "coef.json"), "--name", "m", "--version", "1"]
    args += ["--features", FEATS, "--key", str(world["key"]), "--out", str(tmp_path / "b")]
    subprocess.run(args, check=True, capture_output=True, env=env, timeout=60)
    X = world["X"][:4]
    text = FEATS + "\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in X) + "\n"
    p = subprocess.run(
        [str(EDGELOOP), "model", "predict", str(tmp_path / "b"), "--public-key", str(world["pub"]), "--input", "-"],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    got = [float(r["y_pred"]) for r in csv.DictReader(io.StringIO(p.stdout))]
    np.testing.assert_allclose(got, world["lr"].predict(X), rtol=1e-12)

    p = subprocess.run(
        [
            str(EDGELOOP),
            "model",
            "predict",
            str(tmp_path / "b"),
            "--public-key",
            str(world["other_pub"]),
            "--input",
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.startswith("error: signature of model m v1 does not verify")
    assert "Traceback" not in p.stderr
