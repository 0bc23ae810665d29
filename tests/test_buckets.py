from models.buckets import ladder_bucket, pow2_bucket, pow2_upto
from models.engine import slot_bucket


def test_ladders():
    assert [ladder_bucket(n, 64) for n in (1, 64, 65, 97, 129, 2000, 2049)] == [
        64,
        64,
        96,
        128,
        192,
        2048,
        3072,
    ]
    assert [slot_bucket(n) for n in (1, 8, 9, 17, 20, 25, 33, 49)] == [8, 8, 16, 24, 24, 32, 48, 64]
    assert [pow2_bucket(n, 8) for n in (1, 8, 9, 500)] == [8, 8, 16, 512]
    assert pow2_upto(64, 8) == [8, 16, 32, 64]
    assert pow2_upto(5) == [1, 2, 4, 8]
