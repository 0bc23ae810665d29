from mis_api.chunking import split_items


def test_split_by_count_and_tokens():
    items = [[0] * n for n in (3, 3, 3, 10, 1, 1, 1, 1)]
    assert split_items(items, max_items=3, max_tokens=100) == [
        range(0, 3),
        range(3, 6),
        range(6, 8),
    ]
    # token budget 7: [3,3] | [3] | [10] (alone, over budget) | [1,1,1,1]
    assert split_items(items, max_items=8, max_tokens=7) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 8),
    ]
    assert split_items([], 4, 4) == []
