"""``Store.image``: only the task's own key reads its images; anyone else gets the same NotFound as for a task
that does not exist. Image rows are written through the ORM, so this does not depend on how a task is completed."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from helpers.ledger import Store, creation
from sd3serve.errors import NotFound
from sd3serve.ledger.schema import TaskImage


def task_with_images(credits: Store, tasks: Store, task_id: str, images: list[bytes]) -> int:
    key, _ = credits.create_key(credits=5)
    create = creation(task_id=task_id, key_id=key.id, seed=1, base64=False, media_type="image/webp",
                                request_json="{}", owner="me")  # fmt: skip
    credits.reserve(key_id=key.id, credits=Decimal(1), request_id=task_id, owner="me", with_hold=create)
    with Session(credits.engine) as s, s.begin():
        s.add_all(TaskImage(task_id=task_id, index=i, data=data) for i, data in enumerate(images))
    return key.id


def test_the_owner_reads_each_image_with_its_media_type(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    owner = task_with_images(credits, tasks, "t1", [b"first", b"second"])
    assert tasks.image(task_id="t1", key_id=owner, index=0) == (b"first", "image/webp")
    assert tasks.image(task_id="t1", key_id=owner, index=1) == (b"second", "image/webp")
    with pytest.raises(NotFound, match="no image 2"):
        tasks.image(task_id="t1", key_id=owner, index=2)


def test_another_key_cannot_read_the_images(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    task_with_images(credits, tasks, "t1", [b"first"])
    stranger, _ = credits.create_key(credits=5)
    other_owner = task_with_images(credits, tasks, "t2", [b"theirs"])
    for key_id in (stranger.id, other_owner):
        with pytest.raises(NotFound, match="for this key") as foreign:
            tasks.image(task_id="t1", key_id=key_id, index=0)
    with pytest.raises(NotFound) as missing:
        tasks.image(task_id="nope", key_id=stranger.id, index=0)
    assert str(foreign.value).replace("t1", "?") == str(missing.value).replace("nope", "?")  # nothing leaks


def test_the_owner_of_an_unknown_task_gets_not_found(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    owner = task_with_images(credits, tasks, "t1", [b"first"])
    with pytest.raises(NotFound, match="for this key"):
        tasks.image(task_id="t9", key_id=owner, index=0)


def test_images_are_one_tasks_in_index_order(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    task_with_images(credits, tasks, "t1", [b"i0", b"i1", b"i2"])
    task_with_images(credits, tasks, "t2", [b"other"])
    assert tasks.images(task_id="t1") == [b"i0", b"i1", b"i2"]
    assert tasks.images(task_id="nope") == []
