"""A module whose import never finishes: a child told to preload it never
starts (test_isolation checks the pool's start timeout). Never imported by
the test process itself."""

import time

while True:
    time.sleep(3600)  # wait-ok: the stuck import under test
