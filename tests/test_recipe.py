import tomllib

import pytest
from conftest import ROOT, run_dfm

from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").rglob("*.toml")):
        if "recipe" in tomllib.loads(path.read_text()):
            continue  # a sweep (tests/test_recipes.py checks those)
        r = load_recipe(path)
        assert abs(sum(r.flow.p_stage) - 1) < 1e-9
    qs, fm = load_recipe(ROOT / "recipes/quickstart.toml"), load_recipe(ROOT / "recipes/quickstart_fm.toml")
    assert (qs.flow.levels, fm.flow.levels) == (2, 1)
    assert qs.model == fm.model and qs.train == fm.train and qs.data == fm.data  # same size and compute
    assert sum(qs.sample.steps) == sum(fm.sample.steps)
    big, big_fm = load_recipe(ROOT / "recipes/imagenet512.toml"), load_recipe(ROOT / "recipes/imagenet512_fm.toml")
    assert big.model == big_fm.model and big.train == big_fm.train and (big.flow.levels, big_fm.flow.levels) == (2, 1)
    video = load_recipe(ROOT / "recipes/kinetics.toml")
    assert video.flow.standardize and video.data.frames and video.train.steps == 200000


def test_defaults_broadcast_and_overrides(tmp_path):
    r = load_recipe(
        write(tmp_path, "[flow]\nlevels = 3\n[sample]\nsteps = [10, 5, 5]\ntau = 0.8\n[model]\nname = 'DFM-S/4'\n"),
        ["train.steps=7", "train.lr=3e-4", "data.name=animal-mnist", "sample.cfg=2"],
    )
    assert r.flow.factors == [2, 2] and r.sample.tau == [0.8, 0.8]
    assert r.flow.p_stage == [0.9, 0.05, 0.05]
    assert (r.train.steps, r.train.lr, r.sample.cfg) == (7, 3e-4, 2.0)
    # the resolved recipe round-trips
    again = write(tmp_path, r.to_toml())
    assert load_recipe(again) == r


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("[train]\nstesp = 10\n", [], r"r.toml \(line 2\): train.stesp is not a known key; did you mean 'steps'"),
        ("[trian]\nsteps = 10\n", [], r"unknown section \[trian\]; did you mean 'train'"),
        ("[train]\nsteps = 'ten'\n", [], r"train.steps = 'ten' has the wrong type: expected int"),
        ("[train]\nlr = true\n", [], r"train.lr = True has the wrong type: expected float"),
        (
            "",
            ["data.resolution=30", "flow.levels=3", "sample.steps=[1,1,1]"],
            r"data.resolution = 30: with flow.levels = 3 and flow.factors = \[2, 2\]: H=30, W=30 is not divisible",
        ),
        ("", ["flow.p_stage=[0.5, 0.6]"], r"flow.p_stage = \[0.5, 0.6\]: must sum to 1"),
        ("", ["sample.steps=[40]"], r"sample.steps = \[40\]: needs 2 step counts"),
        ("", ["train.step=3"], r"train.step is not a known key; did you mean 'steps'"),
        ("", ["trainsteps"], r"expected section.key=value"),
        ("", ["data.name=foldr"], r"did you mean 'folder'"),
        ("", ["model.name=DFM-B/2", "flow.levels=3", "sample.steps=[1,1,1]"], r"model.name = 'DFM-B/2'.*patch >= 4"),
    ],
)
def test_bad_recipes_name_file_key_and_value(tmp_path, text, overrides, message):
    with pytest.raises(DfmError, match=message):
        load_recipe(write(tmp_path, text), overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DfmError, match="not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(DfmError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\n"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "text,key",
    [
        ("[train]\nstesp = 10\n", "train.stesp"),
        ("[train]\nbatch_size = 'big'\n", "train.batch_size"),
        ("[flow]\nlevels = 4\n[sample]\nsteps = [1, 1, 1, 1]\n[data]\nresolution = 36\n", "flow.levels"),
    ],
)
def test_cli_rejects_bad_recipes_in_one_line_without_traceback(tmp_path, text, key):
    proc = run_dfm("train", write(tmp_path, text), "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(tmp_path / "r.toml") in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.e2e
def test_dry_run_prints_the_resolved_recipe(tmp_path):
    proc = run_dfm(
        "train", ROOT / "recipes/quickstart.toml", "--set", "train.steps=3", "--dry-run", "--out", tmp_path / "run"
    )
    assert "steps = 3" in proc.stdout and "p_stage" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=-1e-4", r"train.lr = -0.0001: must be a number above 0"),
        ("train.lr=0", r"train.lr = 0.0: must be a number above 0"),
        ("train.lr=nan", r"train.lr = nan: must be a number above 0"),
        ("train.warmup_steps=-3", r"train.warmup_steps = -3: must be 0 or more"),
        ("train.betas=[0.9]", r"train.betas = \[0.9\]: needs exactly two values in \[0, 1\)"),
        ("train.betas=[0.9, 0.99, 0.999]", r"needs exactly two values"),
        ("train.betas=[0.9, 1.0]", r"needs exactly two values in \[0, 1\)"),
        ("train.betas=[-0.1, 0.99]", r"needs exactly two values in \[0, 1\)"),
        ("model.class_dropout=1.5", r"model.class_dropout = 1.5: must be in \[0, 1\]"),
        ("model.class_dropout=-0.1", r"model.class_dropout = -0.1: must be in \[0, 1\]"),
        ("train.eps=0", r"train.eps = 0.0: must be a number above 0"),
        ("train.weight_decay=-0.01", r"train.weight_decay = -0.01: must be 0 or more"),
        ("train.grad_clip=0", r"train.grad_clip = 0.0: must be a number above 0"),
        ("train.steps=0", r"train.steps = 0: must be at least 1"),
        ("train.batch_size=0", r"train.batch_size = 0: must be at least 1"),
        ("sample.n=0", r"sample.n = 0: must be at least 1"),
        ("sample.steps=[3, 0]", r"sample.steps = \[3, 0\]: every entry must be at least 1"),
        ("data.num_workers=-1", r"data.num_workers = -1: must be 0 or more"),
        (
            "data.resolution=65536",
            r"data.resolution = 65536: one batch of 64 images at 65536 px is 3,072 GiB as float32"
            r".*over the 64 GiB limit",
        ),
        ("model.specialize=experts", r"model.specialize = 'experts': choose one of none, mlp, all"),
        ("train.eval_every=-1", r"train.eval_every = -1: must be 0 or more"),
        ("train.eval_num=0", r"train.eval_num = 0: must be at least 1"),
        ("train.eval_metrics=['fid', 'kid']", r"train.eval_metrics = \['fid', 'kid'\]: choose one or more of fid, swd"),
        ("train.eval_metrics=[]", r"choose one or more of fid, swd"),
        ("flow.decomposition=wavelet", r"flow.decomposition = 'wavelet': choose one of laplacian, dwt, dct"),
        ("sample.tau=[1.0]", r"sample.tau = \[1.0\]: each tau must lie in \(0, 1\)"),
        ("sample.tau=[0]", r"sample.tau = \[0.0\]: each tau must lie in \(0, 1\)"),
        ("sample.cfg=-1", r"sample.cfg = -1.0: must be 0 or more"),
        ("sample.guidance_interval=[0.9, 0.1]", r"needs \[low, high\] with 0 <= low <= high <= 1"),
        ("flow.t_scale=0", r"flow.t_scale = 0.0: must be a number above 0"),
        ("train.ema_decay=1.0", r"train.ema_decay = 1.0: must be in \[0, 1\)"),
    ],
)
def test_every_key_has_its_range(tmp_path, override, message):
    with pytest.raises(DfmError, match=message):
        load_recipe(write(tmp_path, ""), [override])


def test_three_level_tau_must_not_decrease(tmp_path):
    base = ["flow.levels=3", "sample.steps=[2, 2, 2]", "model.name=DFM-N/4", "data.resolution=32"]
    assert load_recipe(write(tmp_path, ""), [*base, "sample.tau=[0.5, 0.8]"]).sample.tau == [0.5, 0.8]
    with pytest.raises(DfmError, match=r"sample.tau = \[0.8, 0.5\]: .*never decreasing"):
        load_recipe(write(tmp_path, ""), [*base, "sample.tau=[0.8, 0.5]"])


def test_the_boundaries_themselves_are_accepted(tmp_path):
    r = load_recipe(
        write(tmp_path, ""),
        [
            "train.warmup_steps=0",
            "model.class_dropout=1.0",
            "train.betas=[0, 0.999]",
            "train.weight_decay=0",
            "train.eval_every=0",
            "train.eval_metrics=['swd']",
            "model.specialize=mlp",
            "data.resolution=4096",
            "train.batch_size=8",
        ],
    )
    assert r.model.class_dropout == 1.0 and r.train.betas == [0.0, 0.999]


@pytest.mark.e2e
def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("# café\n[train]\nsteps = 3\n".encode("latin-1"))
    with pytest.raises(DfmError, match=r"latin1.toml: not a readable recipe \(TOML, UTF-8\) \('utf-8' codec"):
        load_recipe(path)
    proc = run_dfm("train", path, "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "latin1.toml" in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["flow.method=cascaded", "flow.precondition=true"],
            r"flow.precondition = True: is not used by flow.method = 'cascaded'",
        ),
        (
            ["flow.method=pyramidal", "train.init_from=runs/fm"],
            r"train.init_from = 'runs/fm': starting from a trained model is for flow.method = 'dfm'",
        ),
        (["flow.method=pyramid"], r"flow.method = 'pyramid': choose 'dfm' \(FM with flow.levels = 1\), 'pyramidal' or"),
        (
            ["flow.method=pyramidal", "flow.standardize=true"],
            r"flow.standardize = True: is not used by flow.method = 'pyramidal' .*leave it at False",
        ),
        (
            [
                "flow.method=pyramidal",
                "flow.levels=1",
                "flow.p_stage=[1.0]",
                "flow.factors=[]",
                "sample.steps=[5]",
                "sample.tau=[]",
            ],
            r"flow.levels = 1: Pyramidal Flow needs at least 2 stages",
        ),
        (["model.kind=flux"], r"data.name = 'animal-mnist': model.kind = 'flux' is text-conditioned"),
        (
            ["model.kind=flux", "data.name=folder", "data.path=x", "model.specialize=mlp"],
            r"model.specialize = 'mlp': per-stage experts are built for model.kind = 'dfm'",
        ),
        (
            ["model.kind=flux", "data.name=folder", "data.path=x", "flux.axes_dims_rope=[2, 2, 2]"],
            r"flux.axes_dims_rope = \[2, 2, 2\]: must sum to flux.attention_head_dim \(32\)",
        ),
    ],
)
def test_methods_and_model_kinds_refuse_what_they_do_not_use(tmp_path, overrides, message):
    with pytest.raises(DfmError, match=message):
        load_recipe(write(tmp_path, ""), overrides)
