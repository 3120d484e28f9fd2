"""metrics.py with a metric that gives some or all images a non-finite score (issue 31, case 10): a note under the
table says how many, and a metric that scored no image at all is an error (exit 2) after the table is printed."""

import json
import textwrap

import pytest

import metrics

PLUGIN = textwrap.dedent(
    """
    import torch

    def nan_for_fields(prompts, images):  # finite for the probe's prompts
        scores = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor(["field" in p for p in prompts]), float("nan"), scores)

    def nan_after_probe(prompts, images):
        nan = torch.full((len(prompts),), float("nan"))
        return images.mean(dim=(1, 2, 3)) if prompts[0] == "a photo of a cat" else nan
    """
)


def run(tmp_path, capsys, *metric_names):
    (tmp_path / "nan_metrics.py").write_text(PLUGIN)
    (tmp_path / "prompts.txt").write_text("a red car\na green field\na blue lake\n")
    argv = ["--pretrained-model", "builtin:tiny-sd3", "--prompt-set", str(tmp_path / "prompts.txt"), "--num-prompts",
            "3", "--num-repeats", "2", "--num-steps", "2", "--resolution", "64", "--device", "cpu", "--out",
            str(tmp_path / "results.json"), "--metrics", "redness",
            *(f"plugin:1:{tmp_path / 'nan_metrics.py'}:{name}" for name in metric_names)]
    try:
        metrics.main(argv)
    except SystemExit as e:
        return e.code, *capsys.readouterr()
    return 0, *capsys.readouterr()


def test_some_non_finite_scores_are_counted_under_the_table(tmp_path, capsys):
    code, out, err = run(tmp_path, capsys, "nan_for_fields")
    assert code == 0, err[-2000:]
    table = out[out.index("metric "):out.index("wrote ")].splitlines()
    assert table[-2].startswith("(3 prompts x 2 of ")
    assert table[-1] == ("nan_for_fields: 2 of 6 images got a non-finite score (NaN or inf), so its mean and "
                         "interval are undefined")
    stats = json.loads((tmp_path / "results.json").read_text())["stats"]
    assert stats["nan_for_fields"]["n_nonfinite"] == 2 and stats["redness"]["n_nonfinite"] == 0


def test_a_metric_that_scores_no_image_is_an_error_after_the_table(tmp_path, capsys):
    code, out, err = run(tmp_path, capsys, "nan_after_probe")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert out[out.index("metric "):out.index("wrote ")].splitlines()[-1] == (
        "nan_after_probe: 6 of 6 images got a non-finite score (NaN or inf), so its mean and interval are undefined; "
        "it scored none of them")
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: nan_after_probe gave every image a non-finite score (NaN or inf)")
    assert (tmp_path / "results.json").is_file()  # the record of what happened is kept


@pytest.mark.parametrize("bad", [0, 1])
def test_the_comparison_notes_each_side(bad):
    from fdfo.eval_table import check_scored, format_comparison

    def side(n_bad):
        return {"checkpoint": "c", "guidance_scale": 1.0, "num_prompts": 2, "num_repeats": 1, "prompt_set": "p",
                "stats": {"m": {"mean": None if n_bad else 1.0, "ci95": [None, None], "n": 2, "n_images": 2,
                                "n_nonfinite": n_bad}}}

    results = {"a": side(0), "b": side(2 * bad), "difference": {"m": {"mean_difference": None, "ci95": [None, None],
                                                                       "p_value": None, "n": 2}}}
    lines = format_comparison(results).splitlines()
    if bad:
        assert lines[-1].startswith("B: m: 2 of 2 images got a non-finite score")
        with pytest.raises(Exception, match="^B: m gave every image a non-finite score"):
            check_scored(results)
    else:
        assert lines[-1].startswith("(2 prompts x 1 of p") and check_scored(results) is None
