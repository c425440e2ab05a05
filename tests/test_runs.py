import os
import stat

from loratune.cli.main import main
from loratune.runs import run_lock, use_plain_file_modes, write_text_atomic


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [path.name for path in target.parent.iterdir()] == ["metrics.json"]


def test_atomic_write_uses_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        os.umask(0o077)
        write_text_atomic(tmp_path / "b.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_plain_file_modes_follow_umask(tmp_path):
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    previous = os.umask(0o022)
    try:
        use_plain_file_modes(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644


def test_second_run_into_locked_folder_fails(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    args = ["train", str(recipe), f"model.name_or_path={tiny_llama_dir}", "data.source=demo",
            f"train.output_dir={run_dir}", "train.max_steps=1", "train.batch_size=2", "--no-eval"]

    with run_lock(run_dir):
        assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: another loratune process (pid {os.getpid()}) is training into {run_dir}; "
        "wait for it to finish or choose another train.output_dir"
    )
    assert not run_dir.exists()

    assert main(args) == 0
    assert (run_dir / "adapter").is_dir()
