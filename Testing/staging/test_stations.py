"""Station catalogue and station-name parsing."""

from __future__ import annotations

import pytest

from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.staging.stations import (
    NUM_STATIONS,
    STATION_NAMES,
    STATIONS,
    mirror,
    parse_station,
    parse_station_list,
    parse_stations,
)


def test_catalogue_order_labels_and_fields():
    assert STATION_NAMES == ("1L", "1R", "2L", "2R", "3A", "3P", "4L", "4R", "5", "6", "7", "8", "9",
                             "10L", "10R", "11L", "11R")
    assert NUM_STATIONS == 17
    assert [s.label for s in STATIONS] == list(range(1, 18))
    assert [s.index for s in STATIONS] == list(range(17))
    colours = set()
    for s in STATIONS:
        assert s.side in ("R", "L", "M")
        assert s.side == (s.name[-1] if s.name[-1] in "RL" else "M")
        assert s.iaslc_name and len(s.definition) > 20
        assert len(s.color) == 3 and all(0 <= c <= 255 for c in s.color)
        colours.add(s.color)
    assert len(colours) == 17, "default colours must be distinct"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4R", "4R"), ("4r", "4R"), (" 4 R ", "4R"), ("Station 4R", "4R"), ("station 4r", "4R"), ("LN 7", "7"),
        ("#10L", "10L"), ("10-l", "10L"), ("3A", "3A"), ("3a", "3A"), ("3AL", "3A"), ("3AR", "3A"),
        ("3PR", "3P"), ("3pl", "3P"), ("7L", "7"), ("7R", "7"), ("8R", "8"), ("8L", "8"), ("9L", "9"),
        ("9R", "9"), ("11Rs", "11R"), ("11Ri", "11R"), ("11RS", "11R"), ("5", "5"), ("6", "6"), ("1L", "1L"),
    ],
)
def test_parse_variants(text, expected):
    assert parse_station(text).name == expected


@pytest.mark.parametrize("bad", ["12R", "4", "3", "10", "11", "4X", "", "R4", "Station", "11Rx", "14L", "2"])
def test_parse_rejects_and_lists_valid_names(bad):
    with pytest.raises(UsageError) as exc:
        parse_station(bad)
    msg = str(exc.value)
    assert repr(bad) in msg
    for name in STATION_NAMES:
        assert name in msg


def test_parse_lists_merge_substations_and_sort():
    assert [s.name for s in parse_stations(["7R", "7L", "4R", "3AL", "3AR"])] == ["3A", "4R", "7"]
    assert [s.name for s in parse_station_list("10R; 4r ;Station 7")] == ["4R", "7", "10R"]
    assert parse_station_list("") == []


def test_labels_and_mirror():
    for s in STATIONS:
        m = mirror(s)
        assert mirror(m) == s
        assert m.number == s.number
        if s.side != "M":
            assert m.side != s.side
