"""The field registry (sdtrt/requests/fields.py) is the one declaration of every request field: each place that
lists fields is made from it, and the docs' table is current."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from sdtrt.contract.spec import IMG2IMG, TXT2IMG
from sdtrt.requests.fields import A1111_AS_IS, FIELDS, INFOTEXT_FIELDS, fields_of, tab_fields
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, request_fields

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_table_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "field_table.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_requests_and_the_spec_table_are_the_registry():
    assert [f.name for f in dataclasses.fields(Txt2ImgRequest)] == [f.name for f in fields_of(TXT2IMG)]
    assert [f.name for f in dataclasses.fields(Img2ImgRequest)] == [f.name for f in fields_of(IMG2IMG)]
    table = request_fields(512, 256, 1024, 8, 4, 12, 3600)
    assert list(table) == [f.name for f in FIELDS]
    assert table["width"].maximum == 1024 and table["batch_size"].maximum == 4 and table["prompt"].max_length == 3600


def test_the_cli_gateway_page_and_infotext_read_the_registry():
    from sdtrt.client.apps.a1111_requests import Img2ImgBody, Txt2ImgBody
    from sdtrt.client.apps.cli import build_parser
    from sdtrt.requests.generation import settings_from_infotext

    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    for job in (TXT2IMG, IMG2IMG):
        flags = commands[job]._option_string_actions
        assert all(f.cli_flag in flags for f in fields_of(job) if f.name != "prompt"), job
    for body, job in ((Txt2ImgBody, TXT2IMG), (Img2ImgBody, IMG2IMG)):
        as_is = {f.a1111 for f in FIELDS if f.a1111_as_is and job in f.shown_in}
        assert as_is <= set(body.model_fields), (job, as_is - set(body.model_fields))
        assert body.model_fields["steps"].default == 50  # A1111's API default, not sdtrt's
    assert set(A1111_AS_IS.values()) <= {f.name for f in FIELDS}
    assert "clip_skip" not in tab_fields(TXT2IMG) and "enable_hr" not in tab_fields(IMG2IMG)
    assert "mask_blur" in tab_fields(IMG2IMG) and "hr_scale" in tab_fields(TXT2IMG)
    read = settings_from_infotext("a cat\nSteps: 7, CFG scale: 3, Clip skip: 2, RNG: NV")
    assert (read["steps"], read["guidance_scale"], read["clip_skip"], read["randn_source"]) == ("7", "3", "2", "NV")
    assert set(INFOTEXT_FIELDS.values()) <= {f.name for f in FIELDS}
