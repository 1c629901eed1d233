"""The benchmark scripts run end to end on tiny settings (their timings are not checked here)."""

from benchmarks import couplings, likelihood, train_step


def test_train_step_benchmark_runs():
    report = train_step.main(["--batch", "32", "--width", "16", "--repeats", "1", "--inner", "2"])
    for name in ("plain I-CFM", "fmjax I-CFM", "fmjax OT-CFM (exact)"):
        assert f"| {name} |" in report


def test_coupling_benchmark_runs():
    report = couplings.main(["--sizes", "32", "--repeats", "1", "--hungarian-max", "32"])
    assert "| 32 | fmjax exact |" in report and "| 32 | ott Hungarian |" in report
    exact_rows = [line for line in report.splitlines() if "exact" in line or "Hungarian" in line]
    for line in exact_rows:  # exact solvers sit at the optimum: last column is cost / optimum - 1
        assert abs(float(line.strip("| ").split("|")[-1])) < 1e-6


def test_likelihood_benchmark_runs():
    report = likelihood.main(["--dims", "2", "--dim", "3", "--steps", "2", "--repeats", "1"])
    assert "fmjax exact" in report and "not installed" in report
