"""examples/quickstart, the README's "Using CMD in your own Flower app", through `flwr run`.

The README shows the example's ClientApp and ServerApp verbatim, and this module runs that very
app (4 SuperNodes, Ray simulation, a CNN with BatchNorm) so neither can drift from the code.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.test_flwr_run import REPO, describe_output, run_script

EXAMPLE = REPO / "examples" / "quickstart"
ROUNDS = 6
WARMUP = 2  # server_app.py's EmbeddingSchedule(warmup=2, ...)


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.mark.parametrize("name", ["client_app.py", "server_app.py"])
def test_readme_shows_the_example_verbatim(name: str) -> None:
    blocks = _python_blocks((REPO / "README.md").read_text())
    source = (EXAMPLE / name).read_text()
    assert any(block == f"# examples/quickstart/{name}\n{source}" for block in blocks), (
        f"README's snippet of {name} differs from examples/quickstart/{name}"
    )


def test_quickstart_runs_under_cmd_and_learns(tmp_path: Path) -> None:
    # Execute: the README's own app, through scripts/run_simulation.sh and `flwr run`
    results = tmp_path / "results"
    returncode, output, leftover, _ = run_script(
        tmp_path,
        f"num-server-rounds={ROUNDS} results-dir='{results}'",
        {"CMD_FL_APP": str(EXAMPLE)},
    )
    # Assert: it completed, learned, and CMD shrank the replies after the warm-up
    assert returncode == 0, describe_output(returncode, output)
    assert not leftover
    final = re.search(r"\[cmd-fl\] final accuracy ([0-9.]+)", output)
    assert final is not None, describe_output(returncode, output)
    assert float(final.group(1)) > 0.8
    with (results / "ledger.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    uplink: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        if row["phase"] == "train" and row["direction"] == "up":
            uplink[int(row["round"])].append(int(row["wire_bytes"]))
    assert sorted(uplink) == list(range(1, ROUNDS + 1))
    assert all(len(sizes) == 4 for sizes in uplink.values())  # no reply was lost or rejected
    assert max(uplink[ROUNDS]) < 0.6 * min(uplink[1])


def test_a_serverapp_that_raises_fails_the_script(tmp_path: Path) -> None:
    # Prepare: the quickstart with a ServerApp that raises before its first round
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app)
    source = (app / "server_app.py").read_text()
    (app / "server_app.py").write_text(
        source.replace("    model = Net()\n", '    raise RuntimeError("broken on purpose")\n', 1)
    )
    # Execute
    returncode, output, _, _ = run_script(tmp_path, "num-server-rounds=2", {"CMD_FL_APP": str(app)})
    # Assert: Flower itself would report the run as completed; the script must not
    assert returncode != 0, describe_output(returncode, output)
    assert "broken on purpose" in output
