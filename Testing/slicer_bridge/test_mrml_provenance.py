"""The Slicer scene says when a result was computed with the synthetic demo atlases or the demo model: first line of
the report text node, a node attribute, and a red second line in the colour legend's title that every view shows."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402

from LymphNodeStagingLib.slicer import mrml


def _result(case, demo: bool):
    result = dataclasses.replace(case.result, warnings=[], stations=[dataclasses.replace(s, flags=list(s.flags))
                                                                    for s in case.result.stations])
    result.set_provenance(demo, demo)
    return result


def _show(app, case, result):
    ct = mrml.volume_node_from_image(app.scene, case.ct, "CT")
    pet = mrml.volume_node_from_image(app.scene, case.pet, "PET")
    view = app.slice_view(size=384)  # before the legend node: its displayable manager makes the legend actor then
    mrml.show_pet_over_ct(app.scene, ct, pet)
    nodes = mrml.show_result(app.scene, result, case.stations, reference_node=ct)
    view.fit()
    mrml.jump_to_station(app.scene, result, "4R", nodes.segmentation)
    return nodes, view


def test_demo_result_is_marked_in_the_scene(app, case):
    result = _result(case, demo=True)
    result.warnings.append("implausible station map: low atlas agreement (below 0.33) at 4R (0.21)")
    nodes, _ = _show(app, case, result)
    text = nodes.text.GetText().splitlines()
    assert text[0] == result.demo_banner and text[0].startswith("*** SYNTHETIC DEMO ATLASES AND MODEL")
    assert "- implausible station map: low atlas agreement (below 0.33) at 4R (0.21)" in text
    assert sum(result.provenance["statement"].upper() in line for line in text) == 1  # not repeated as a warning
    for node in (nodes.segmentation, nodes.table, nodes.text):
        assert node.GetAttribute(mrml.ATTR_PROVENANCE) == result.provenance["statement"]
    assert nodes.legend.GetTitleText() == f"{mrml.LEGEND_TITLE}\n{mrml.LEGEND_DEMO_LINE}"
    assert tuple(nodes.legend.GetTitleTextProperty().GetColor()) == mrml.LEGEND_DEMO_COLOR
    # a saved scene keeps it: the result read back from the node has the provenance
    assert mrml.result_from_node(nodes.segmentation).demo_banner == result.demo_banner
    # re-showing a user result in the same nodes removes every mark
    mrml.update_result(nodes, _result(case, demo=False))
    assert nodes.text.GetText().startswith("Case ") and nodes.segmentation.GetAttribute(mrml.ATTR_PROVENANCE) == ""
    assert nodes.legend.GetTitleText() == mrml.LEGEND_TITLE
    assert tuple(nodes.legend.GetTitleTextProperty().GetColor()) == (1.0, 1.0, 1.0)


def test_user_result_has_no_mark(app, case):
    result = _result(case, demo=False)
    nodes, _ = _show(app, case, result)
    assert nodes.text.GetText().startswith("Case ") and "Warnings:" not in nodes.text.GetText()
    assert nodes.segmentation.GetAttribute(mrml.ATTR_PROVENANCE) == ""
    assert nodes.legend.GetTitleText() == mrml.LEGEND_TITLE


def _title_red_pixels(path) -> int:
    """Red pixels in the band above the colour bar (where the legend's title is drawn)."""
    img = headless_slicer.read_png(path)
    size = img.shape[0]
    band = img[: int(0.3 * size), size // 2:]
    r, g, b = band[..., 0], band[..., 1], band[..., 2]
    return int(((r > 180) & (g < 120) & (b < 120)).sum())


def test_views_show_the_demo_line(case, tmp_path):
    counts = {}
    for demo in (True, False):
        app = headless_slicer.HeadlessSlicer(tmp_path / f"home-{demo}")
        try:
            _, view = _show(app, case, _result(case, demo))
            counts[demo] = _title_red_pixels(view.save_png(tmp_path / f"axial-{demo}.png"))
        finally:
            app.close()
    assert counts[True] > 100 and counts[False] < 10, counts
