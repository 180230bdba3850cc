"""Command lines refuse mistakes before any work: unknown options, missing folders; ``--help`` prints real help.

The ``python -m scripts.<tool>`` entry points run here in this process (runpy executes their ``__main__`` block as
the interpreter would); ``monai.bundle run``'s option check runs on a command line given to it.
"""

import inspect
import runpy
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.utils.cli import UsageError, check_arguments, check_bundle_command_line, main, unknown_bundle_options

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_MAIN = str(Path(sys.modules["monai"].__file__).parent / "bundle" / "__main__.py")


def prepare(dataset_dir: str, prepared_dir: str, labeled_fraction: float = 0.25, progress: bool = True) -> str:
    """Split DATASET_DIR into PREPARED_DIR.

    A second paragraph that only the command's own help shows.
    """
    if labeled_fraction > 1:
        raise ValueError(f"labeled_fraction must be at most 1, got {labeled_fraction}")
    return f"{dataset_dir}|{prepared_dir}|{labeled_fraction}|{progress}"


# ---- the shared wrapper ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--dataset_dir", "d", "--prepared_dir", "p"],
        ["d", "p", "0.5"],
        ["--dataset_dir=d", "--prepared_dir", "p", "--noprogress"],
        ["d", "--prepared_dir", "p", "--progress", "--labeled_fraction", "-1"],
    ],
)
def test_check_arguments_accepts_what_fire_accepts(args):
    check_arguments(prepare, args, "prepare")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--dataset_dir", "d", "--prepared_dir", "p", "--labelled_fraction", "0.3"],
            "unknown option --labelled_fraction for prepare: did you mean --labeled_fraction?",
        ),
        (["--dataset_dir", "d", "--prepared_dir", "p", "--zzz", "1"], "valid: --dataset_dir, --prepared_dir"),
        (["d", "p", "0.5", "True", "surplus"], "unexpected value 'surplus'"),
        (["--dataset_dir", "d"], "prepare needs --prepared_dir PREPARED_DIR"),
        (["--dataset_dir", "--prepared_dir", "p"], "option --dataset_dir of prepare needs a value"),
    ],
)
def test_check_arguments_refuses_with_the_option_named(args, message):
    with pytest.raises(UsageError) as error:
        check_arguments(prepare, args, "prepare")
    assert message in str(error.value)


def test_main_runs_a_command_and_turns_a_users_error_into_one_line(capsys):
    commands = {"prepare": prepare}
    assert (
        main(commands, argv=["prepare", "d", "p", "--labeled_fraction", "0.5"], serialize=lambda _: None)
        == "d|p|0.5|True"
    )
    with pytest.raises(SystemExit) as exit_:
        main(commands, argv=["prepare", "d", "p", "--labeled_fraction", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: labeled_fraction must be at most 1, got 2\n"  # one line, no traceback
    with pytest.raises(SystemExit) as exit_:
        main(commands, argv=["prepar", "d", "p"], prog="tool")
    assert exit_.value.code == 2
    assert "unknown command 'prepar' for tool: did you mean prepare?" in capsys.readouterr().err


def test_main_help_prints_the_docstrings_and_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main({"prepare": prepare}, "The tool's manual.", prog="tool", argv=["prepare", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tool prepare --dataset_dir DATASET_DIR --prepared_dir PREPARED_DIR")
    assert "A second paragraph that only the command's own help shows." in out and "The tool's manual." in out
    assert "--labeled_fraction  0.25" in out and "--prepared_dir" in out
    with pytest.raises(SystemExit) as exit_:
        main({"prepare": prepare, "other": prepare}, "The tool's manual.", prog="tool", argv=[])
    assert exit_.value.code == 2  # no command at all: the overview, as a usage error
    err = capsys.readouterr().err
    assert "The tool's manual." in err and "  prepare  Split DATASET_DIR into PREPARED_DIR." in err


# ---- every python -m scripts.<tool> ------------------------------------------------------------------------------

ENTRY_POINTS = [  # (module or file, command words, one option it takes, the docstring words its help shows)
    ("scripts.data", ["prepare"], "--labeled_fraction", "Write PREPARED_DIR/datalist.json"),
    ("scripts.experiments.compare", ["run"], "--fractions", "Train and evaluate every (method, fraction, seed)"),
    ("scripts.experiments.benchmark", ["latency"], "--runs", "Median batch-1 UNeXt inference"),
    ("scripts.clinical.pacs", ["run"], "--study_uid", "PACS round trip over DICOMweb"),
    ("scripts.method.pretrain", [], "--max_train_images", "masked-image modelling"),
    ("scripts.tools.monailabel_venv", [], "--cache_dir", "Print the python of MONAI Label's venv"),
    (
        "scripts/deployment/monailabel_app.py",
        ["export"],
        "--train_overrides",
        "Write the MONAI Label copy of the bundle",
    ),
]


def run_entry_point(target: str, args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [target, *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # monailabel_app.py trims sys.path when run as a file
    with pytest.raises(SystemExit) as exit_:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    return exit_.value.code


@pytest.mark.parametrize("target, command, option, doc", ENTRY_POINTS)
def test_every_command_has_real_help(target, command, option, doc, monkeypatch, capsys):
    assert run_entry_point(target, [*command, "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert doc in out and f"  {option} " in out


@pytest.mark.parametrize("target, command, option, doc", ENTRY_POINTS)
def test_every_command_refuses_an_unknown_option_before_any_work(
    target, command, option, doc, monkeypatch, capsys, tmp_path
):
    monkeypatch.chdir(tmp_path)
    misspelled = option[:-1]  # --labeled_fractio, --fraction, --run, ...
    assert run_entry_point(target, [*command, misspelled, "1"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"unknown option {misspelled} " in err and option in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_bare_pacs_prints_its_help_not_a_key_error(monkeypatch, capsys):
    assert run_entry_point("scripts.clinical.pacs", [], monkeypatch) == 2
    assert "commands:\n  run " in capsys.readouterr().err


def test_prepare_on_a_missing_folder_fails_and_creates_nothing(monkeypatch, capsys, tmp_path):
    missing, prepared = tmp_path / "HC18_typo", tmp_path / "prepared"
    code = run_entry_point(
        "scripts.data", ["prepare", "--dataset_dir", str(missing), "--prepared_dir", str(prepared)], monkeypatch
    )
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: dataset_dir does not exist: {missing} (leave dataset_dir at its default to train on the phantom)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_prepare_never_fills_a_named_empty_folder_with_a_phantom(monkeypatch, capsys, tmp_path):
    empty = tmp_path / "my_data"
    empty.mkdir()
    assert (
        run_entry_point(
            "scripts.data", ["prepare", "--dataset_dir", str(empty), "--prepared_dir", str(tmp_path / "p")], monkeypatch
        )
        == 2
    )
    assert "cannot recognise the dataset layout" in capsys.readouterr().err
    assert list(empty.iterdir()) == [] and not (tmp_path / "p").exists()


def test_one_default_labelled_fraction_everywhere():
    from scripts.data.__main__ import prepare as prepare_command
    from scripts.method.pretrain import pretrain

    train = ConfigParser.load_config_file(ROOT / "configs" / "train.json")["labeled_fraction"]
    for command in (prepare_command, pretrain):
        assert inspect.signature(command).parameters["labeled_fraction"].default == train, command.__name__


# ---- python -m monai.bundle run ----------------------------------------------------------------------------------


def merged(*names: str) -> dict:
    return ConfigParser.load_config_files([str(ROOT / "configs" / n) for n in names])


def test_unknown_bundle_options_names_the_key_and_the_closest_valid_ones():
    config = merged("train.json")
    ok = [
        "labeled_fraction",
        "train#trainer#max_epochs",
        "train::trainer::max_epochs",
        "train#handlers#0#print_lr",
        "network_def#drop_rate",  # not in the config, but an argument of its _target_ (UNeXt)
        "validate#dataloader#pin_memory",
    ]  # MONAI's DataLoader passes **kwargs on: any name is accepted
    assert unknown_bundle_options(config, ok) == []
    (top,) = unknown_bundle_options(config, ["labelled_fraction"], "configs/train.json")
    assert top.startswith("unknown option --labelled_fraction for configs/train.json: did you mean --labeled_fraction")
    (nested,) = unknown_bundle_options(config, ["train#trainer#max_epoch"])
    assert "did you mean --train#trainer#max_epochs" in nested
    (argument,) = unknown_bundle_options(config, ["network_def#drop_rat"])
    assert "did you mean --network_def#drop_rate" in argument
    assert unknown_bundle_options(merged("train.json", "evaluate.json"), ["eval_list", "measure_circumference"]) == []


def bundle_argv(*args: str) -> list[str]:
    return [BUNDLE_MAIN, "run", "--config_file", "configs/train.json", *args]


def test_bundle_command_line_check(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert check_bundle_command_line(bundle_argv("--bundle_root", "/tmp/x", "--total_iterations", "2"))
    assert check_bundle_command_line(
        bundle_argv(
            "--tracking", "mlflow", "--tracking_uri", "sqlite:////tmp/m.db", "--experiment_name", "e", "--run_name", "r"
        )
    )
    # not monai.bundle run
    assert check_bundle_command_line(["scripts/clinical/pacs.py", "run", "--labelled_fraction", "1"])
    with pytest.raises(SystemExit) as exit_:
        check_bundle_command_line(bundle_argv("--labelled_fraction", "0.3", "--run_name", "r"))  # no --tracking
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --labelled_fraction for configs/train.json: did you mean --labeled_fraction" in err
    assert "unknown option --run_name" in err and "nothing was run" in err
    with pytest.raises(SystemExit) as exit_:
        check_bundle_command_line(bundle_argv("--help"))
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--labeled_fraction" in out and "0.25" in out and "--total_iterations" in out


def test_inference_takes_dataset_dir_as_its_input_and_input_dir_as_an_alias(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"dataset_dir": str(tmp_path)})
    assert parser.get_parsed_content("input_dir") == str(tmp_path)
    parser.update({"input_dir": str(tmp_path / "other")})
    assert parser.get_parsed_content("input_dir") == str(tmp_path / "other")
