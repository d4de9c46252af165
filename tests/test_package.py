"""What ``import lorakit`` brings in: the core only; the trainer loads on first use."""

import subprocess
import sys


def test_import_lorakit_loads_no_training_or_serving_code():
    code = ("import sys, lorakit; "
            "print(sorted(m for m in sys.modules if m.startswith(('lorakit.training', 'lorakit.serve')))); "
            "lorakit.TrainConfig; print('lorakit.training.loop' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True"]
