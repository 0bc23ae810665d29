from models.buckets import pow2_bucket, pow2_upto


def test_pow2_ladders():
    assert [pow2_bucket(n, 8) for n in (1, 8, 9, 500)] == [8, 8, 16, 512]
    assert pow2_upto(64, 8) == [8, 16, 32, 64]
    assert pow2_upto(5) == [1, 2, 4, 8]
