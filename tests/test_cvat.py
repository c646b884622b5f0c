"""CVAT for images 1.1 parsing (real exports and hand-made edge cases) and the writer's round trip."""

import re
from pathlib import Path

import pytest
from lxml import etree

from shardgen.cvat import AttributeSpec, CvatError, ImageAnnotation, Shape, parse_cvat, parse_labels, write_cvat

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cvat"
SCORE = AttributeSpec("score", "number", ("0", "1", "0.01"), "0")
DOCS_RLE = (3, 5, 7, 7, 5, 9, 3, 11, 2, 11, 2, 12, 1, 12, 1, 26, 1, 12, 1, 12, 2, 11, 3, 9, 5, 7, 7, 5, 3)


def write(tmp_path, body: str, name="ann.xml") -> Path:
    path = tmp_path / name
    path.write_text(f"<annotations>\n<version>1.1</version>\n{body}</annotations>\n", encoding="utf-8")
    return path


def test_datumaro_export_shapes():
    skipped = {}
    img0, img1 = parse_cvat(FIXTURES / "datumaro_for_images_train.xml", skipped=skipped)
    assert (img0.name, img0.width, img0.height, img0.line) == ("img0.jpg", 8, 8, 83)
    assert (img1.name, img1.width, img1.height, img1.subset) == ("img1.jpg", 10, 10, None)

    box, polyline = img0.shapes  # the skeleton's nested <points> are not top-level shapes
    # occluded box with <attribute> children
    assert (box.kind, box.label, box.points, box.z_order, box.line) == (
        "box", "label1", ((0, 2), (4, 4)), 1, 84
    )  # fmt: skip
    assert (polyline.kind, polyline.label, polyline.z_order) == ("polyline", "", 0)
    assert polyline.points == ((1, 2), (3, 4), (5, 6), (7, 8))
    assert [s.order for s in img0.shapes] == [0, 1]

    polygon, points = img1.shapes
    assert (polygon.kind, polygon.label, polygon.points, polygon.z_order) == (
        "polygon", "", ((1, 2), (3, 4), (6, 5)), 1
    )  # fmt: skip
    assert (points.kind, points.label, points.points, points.z_order) == (
        "points", "label2", ((1, 2), (3, 4), (5, 6)), 2
    )  # fmt: skip
    assert skipped == {"skeleton (not a segmentation shape)": 2}


def test_cvat_docs_example_shapes():
    skipped = {}
    (image,) = parse_cvat(FIXTURES / "cvat_docs_example.xml", skipped=skipped)
    assert (image.name, image.width, image.height) == ("filename000.jpg", 1600, 1200)
    assert [(s.kind, s.label, s.z_order) for s in image.shapes] == [
        ("box", "plate", 4),
        ("polygon", "car", 1),
        ("polyline", "traffic_line", 3),
        ("polyline", "traffic_line", 2),
        ("points", "wheel", 5),
        ("mask", "car", 0),
    ]
    box, polygon, line, _, wheel, mask = image.shapes
    assert box.points == ((797.33, 870.92), (965.52, 928.94))
    assert len(polygon.points) == 69 and polygon.points[0] == (561.30, 916.23)
    assert line.points == ((462.10, 0.0), (126.80, 1200.0))
    assert len(wheel.points) == 4
    assert mask.mask_box == (707, 888, 13, 15) and mask.points == ()
    assert mask.rle == DOCS_RLE and sum(mask.rle) == 13 * 15
    assert mask.line == 101
    assert skipped == {"tag (image-level label, not a shape)": 1, "skeleton (not a segmentation shape)": 1}


def test_project_export_subsets_and_repeated_ids(tmp_path):
    path = write(
        tmp_path,
        '<image id="0" name="train/a.png" subset="train" width="4" height="3">\n'
        '  <polygon label="Cloud" points="0,0;3,0;3,2" occluded="0" source="manual" z_order="0"/>\n'
        "</image>\n"
        '<image id="0" name="test/b.png" subset="test" width="5" height="6"/>\n',
    )
    a, b = parse_cvat(path)
    assert (a.name, a.subset, a.width, a.height) == ("train/a.png", "train", 4, 3)
    assert (b.name, b.subset, b.shapes) == ("test/b.png", "test", ())


def test_optional_attributes_and_outside_and_rotation(tmp_path):
    path = write(
        tmp_path,
        '<image id="0" name="a.png" width="20" height="20">\n'
        '  <polygon label="Pit" points="1,1;2,2;1,3"/>\n'
        '  <points label="Pit" points="4,4" outside="1"/>\n'
        '  <box label="Nick" xtl="1" ytl="2" xbr="5" ybr="6" rotation="30.5" z_order="-2"/>\n'
        '  <ellipse label="Cloud" cx="10" cy="11" rx="3" ry="2.5" z_order="1"/>\n'
        '  <polygon label="Pit" points="1,1;2,2"/>\n'
        "  <cuboid label='x'/>\n"
        "</image>\n",
    )
    skipped = {}
    (image,) = parse_cvat(path, skipped=skipped)
    polygon, box, ellipse, short = image.shapes
    assert (polygon.z_order, polygon.rotation) == (0, 0.0)
    assert (box.points, box.rotation, box.z_order) == (((1, 2), (5, 6)), 30.5, -2)
    assert (ellipse.kind, ellipse.points, ellipse.z_order) == ("ellipse", ((10, 11), (3, 2.5)), 1)
    assert len(short.points) == 2  # too short to paint, but judging geometry is the rasterizer's job
    assert [s.order for s in image.shapes] == [0, 1, 2, 3]
    assert skipped == {"shape marked outside": 1, "cuboid (not a segmentation shape)": 1}


def test_malformed_xml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.xml"
    # the <polygon> on line 3 is never closed; the parser notices at </image> on line 4
    path.write_text('<annotations>\n<image name="a.png" width="4" height="4">\n<polygon label="a">\n</image>')
    with pytest.raises(CvatError, match=rf"^{re.escape(str(path))}:4: malformed XML"):
        parse_cvat(path)


@pytest.mark.parametrize(
    ("element", "reason"),
    [
        ('<polygon label="Pit" points="1,1;2,x;3,3"/>', r"bad point '2,x'"),
        ('<polygon label="Pit" points="1,1;2,2,2;3,3"/>', r"bad point '2,2,2'"),
        ('<polyline label="Pit" points="1,1;nan,2"/>', r"non-finite point"),
        ('<box label="Pit" xtl="1" ytl="1" xbr="4"/>', r"<box> has no ybr attribute"),
        ('<polygon points="1,1;2,2;3,3"/>', r"no label attribute"),
        ('<polygon label="Pit" points="1,1;2,2;3,3" z_order="top"/>', r"z_order='top' is not a number"),
        (
            '<mask label="Pit" rle="1, 2, 3" left="0" top="0" width="2" height="2"/>',
            r"mask RLE covers 6 pixels, its box 2x2 has 4",
        ),
        ('<mask label="Pit" rle="1, a" left="0" top="0" width="2" height="2"/>', r"not a list of integers"),
    ],
)
def test_bad_shape_names_file_and_line(tmp_path, element, reason):
    path = write(tmp_path, f'<image id="0" name="a.png" width="8" height="8">\n{element}\n</image>\n')
    with pytest.raises(CvatError, match=rf"^{re.escape(str(path))}:4: .*{reason}"):
        parse_cvat(path)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ('<image id="0" width="8" height="8"/>', "<image> has no name"),
        ('<image id="0" name="a.png" height="8"/>', "<image> has no width attribute"),
        ('<image id="0" name="a.png" width="8" height="0"/>', "has size 8x0"),
        ('<image id="0" name="a.png" width="8.5" height="8"/>', "width='8.5' is not an integer"),
    ],
)
def test_bad_image_names_file_and_line(tmp_path, image, reason):
    path = write(tmp_path, image + "\n")
    with pytest.raises(CvatError, match=rf"^{re.escape(str(path))}:3: .*{reason}"):
        parse_cvat(path)


def test_wrong_document_kinds_are_rejected(tmp_path):
    track = '<track id="0" label="Pit">\n<box frame="0" xtl="1" ytl="1" xbr="2" ybr="2"/>\n</track>\n'
    video = write(tmp_path, track)
    with pytest.raises(CvatError, match=rf"^{re.escape(str(video))}:3: <track> found: .* 'CVAT for video'"):
        parse_cvat(video)
    other = tmp_path / "other.xml"
    other.write_text("<dataset/>")
    with pytest.raises(CvatError, match=rf"^{re.escape(str(other))}:1: root element is <dataset>"):
        parse_cvat(other)


def test_external_entities_are_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("Cloud")
    path = tmp_path / "xxe.xml"
    path.write_text(
        f'<!DOCTYPE annotations [<!ENTITY x SYSTEM "{secret.as_uri()}">]>\n<annotations>\n'
        '<image name="a.png" width="4" height="4">&x;\n<polygon label="&x;" points="1,1;2,2;3,1"/>\n'
        "</image>\n</annotations>\n"
    )
    with pytest.raises(CvatError, match=rf"^{re.escape(str(path))}:4: malformed XML: .*external entity"):
        parse_cvat(path)


def test_write_cvat_round_trip(tmp_path):
    shapes = (
        Shape("polygon", "Cloud", ((1.25, 2.5), (10.0, 2.75), (6.5, 9.0)), 1, 0, 0),
        Shape("polyline", "Needle", ((0.0, 0.0), (3.5, 4.25)), 0, 1, 0),
        Shape("points", "Pinpoint", ((7.0, 7.0),), 2, 2, 0),
        Shape("box", "Nick", ((1.0, 2.0), (5.5, 6.0)), 0, 3, 0, rotation=12.5),
        Shape("ellipse", "Pit", ((8.0, 8.0), (3.0, 2.0)), 0, 4, 0),
        Shape("mask", "Burn mark", (), 3, 5, 0, rle=(1, 2, 3), mask_box=(4, 5, 3, 2), attributes=(("score", "0.42"),)),
    )
    images = [
        ImageAnnotation("train/scan_001.png", 16, 12, shapes, "", 0, subset="train"),
        ImageAnnotation("scan_002.png", 8, 8, (), "", 0),
    ]
    path = tmp_path / "out.xml"
    write_cvat(path, images, ["Cloud", "Needle"], source="auto", attributes=[SCORE])

    back = parse_cvat(path)
    assert [(a.name, a.width, a.height, a.subset) for a in back] == [
        (a.name, a.width, a.height, a.subset) for a in images
    ]
    fields = ("kind", "label", "points", "z_order", "order", "rotation", "rle", "mask_box", "attributes")
    assert [tuple(getattr(s, f) for f in fields) for s in back[0].shapes] == [
        tuple(getattr(s, f) for f in fields) for s in shapes
    ]
    root = etree.parse(str(path)).getroot()
    assert root.findtext("version") == "1.1"
    assert [e.text for e in root.iterfind("meta/task/labels/label/name")] == ["Cloud", "Needle"]
    polygon = root.find("image/polygon")
    assert polygon.get("points") == "1.25,2.50;10.00,2.75;6.50,9.00"
    assert (polygon.get("source"), polygon.get("occluded")) == ("auto", "0")
    mask = root.find("image/mask")
    assert [(a.get("name"), a.text) for a in mask.iterfind("attribute")] == [("score", "0.42")]
    declared = root.find("meta/task/labels/label/attributes/attribute")
    assert [declared.findtext(k) for k in ("name", "input_type", "values")] == ["score", "number", "0\n1\n0.01"]


def test_shape_attributes_are_read():
    (img0, _) = parse_cvat(FIXTURES / "datumaro_for_images_train.xml")
    assert img0.shapes[0].attributes == (("a1", "true"), ("a2", "v3"), ("a3", "0003"), ("a4", "2.4"))
    assert img0.shapes[1].attributes == ()


def test_parse_labels(tmp_path):
    # skeleton parts (labels with a <parent>) cannot carry a shape of their own
    assert parse_labels(FIXTURES / "cvat_docs_example.xml") == ["car", "traffic_line", "wheel", "plate", "s1"]
    assert parse_labels(FIXTURES / "datumaro_for_images_train.xml")[:2] == ["label1", "label2"]
    project = write(tmp_path, "<meta><project><labels><label><name>Pit</name></label><label><name> Nick </name>"
                              "</label></labels></project></meta>\n", "project.xml")  # fmt: skip
    assert parse_labels(project) == ["Pit", "Nick"]
    with pytest.raises(CvatError, match=r"bare.xml:\d+: no <meta> labels found"):
        parse_labels(write(tmp_path, "", "bare.xml"))
    with pytest.raises(CvatError, match=r"missing.xml:0: cannot read"):
        parse_labels(tmp_path / "missing.xml")
