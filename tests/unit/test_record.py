"""Record: the frozen value classes of the core behave as frozen dataclasses do."""

from __future__ import annotations

import pytest

from vif_hotplug.core.record import Record, replace


class Point(Record):
    x: int
    y: int = 0
    label: str | None = None


class Ordered(Record, order=True):
    family: int
    name: str


class Checked(Record):
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"negative: {self.value}")


def test_fields_come_from_annotations_in_order_with_class_defaults() -> None:
    p = Point(1, label="a")
    assert (p.x, p.y, p.label) == (1, 0, "a")
    assert repr(p) == "Point(x=1, y=0, label='a')"


def test_equal_values_are_equal_and_hash_alike_whatever_the_keyword_order() -> None:
    assert Point(1, 2) == Point(y=2, x=1)
    assert hash(Point(1, 2)) == hash(Point(y=2, x=1))
    assert len({Point(1, 2), Point(y=2, x=1), Point(2, 1)}) == 2


def test_records_of_different_classes_with_the_same_values_differ() -> None:
    class Other(Record):
        x: int
        y: int = 0
        label: str | None = None

    assert Point(1) != Other(1)


def test_a_record_cannot_be_changed() -> None:
    p = Point(1)
    with pytest.raises(AttributeError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x  # type: ignore[misc]


@pytest.mark.parametrize("call", [lambda: Point(), lambda: Point(1, 2, "a", 4), lambda: Point(1, x=2),  # type: ignore[call-arg]
                                  lambda: Point(1, z=3)])  # type: ignore[call-arg]
def test_missing_extra_repeated_or_unknown_arguments_are_type_errors(call: object) -> None:
    with pytest.raises(TypeError):
        call()  # type: ignore[operator]


def test_order_compares_field_by_field_and_only_within_the_class() -> None:
    assert sorted([Ordered(6, "a"), Ordered(4, "b"), Ordered(4, "a")]) == [Ordered(4, "a"), Ordered(4, "b"),
                                                                           Ordered(6, "a")]
    with pytest.raises(TypeError):
        assert Ordered(4, "a") < Point(1)  # type: ignore[operator]


def test_post_init_validates_every_construction() -> None:
    assert Checked(1).value == 1
    with pytest.raises(ValueError, match="negative: -1"):
        Checked(-1)


def test_replace_copies_with_changes() -> None:
    p = Point(1, 2, "a")
    assert replace(p, y=5) == Point(1, 5, "a")
    assert p == Point(1, 2, "a")
