import subprocess
import sys


def test_core_imports_no_lightning():
    code = (
        "import sys\n"
        "import lexi_pl.adapter, lexi_pl.profiling, lexi_pl.allocation, lexi_pl.plan\n"
        "import lexi_models.vision, lexi_models.language.loading\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_models_import_nothing_from_lexi_pl():
    code = (
        "import sys\n"
        "import lexi_models.vision, lexi_models.language.loading, lexi_models.language.tiny\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'lexi_pl'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
