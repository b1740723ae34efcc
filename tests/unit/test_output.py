"""The CLI's renderings: -o yaml is YAML that means the same as -o json; tables are never cut."""

import json

import pytest
import yaml

from kubegfs.output import Column, UnsupportedFormat, View, render

DATA = [{"name": "nightly", "path": "/data with space", "files": 3, "ok": True, "none": None,
         "holders": [{"id": "cs-1", "zone": "za"}, {"id": "cs-2", "zone": "zb"}], "empty": [], "map": {},
         "tricky": ["yes", "null", "1.5", "-x", "a: b", "#c", "", "ünï"], "n": {"f": 1.25, "neg": -3}}]


def test_yaml_means_what_json_means():
    assert yaml.safe_load(render(DATA, "yaml")) == json.loads(render(DATA, "json")) == DATA
    assert yaml.safe_load(render(DATA[0], "yaml")) == DATA[0]


def test_table_is_plain_and_whole():
    view = View((Column("NAME", lambda d: d["name"]), Column("PATH", lambda d: d["path"]),
                 Column("FILES", lambda d: d["files"], wide=True)), lambda d: d["name"])
    long = {"name": "x" * 300, "path": "/p", "files": 1}
    text = render([long, DATA[0]], None, view)
    assert text.splitlines()[0].split() == ["NAME", "PATH"] and "x" * 300 in text
    assert render([long], "wide", view).splitlines()[0].split() == ["NAME", "PATH", "FILES"]
    assert render([long, DATA[0]], "name", view) == "x" * 300 + "\nnightly"
    with pytest.raises(UnsupportedFormat):
        render(DATA, "name", View((), None))
