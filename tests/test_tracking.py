import json

from rlhf.runtime.tracking import truncate_metrics


def test_truncate_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    # A run checkpointed after step 1 (resume at step 2), logged steps 2 and 3, and was killed while writing step 4.
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "score": s / 10}) for s in range(4)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "sco')
    truncate_metrics(str(path), last_step=1)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


def test_truncate_without_a_file_does_nothing(tmp_path):
    truncate_metrics(str(tmp_path / "missing.jsonl"), last_step=3)
    assert not (tmp_path / "missing.jsonl").exists()
