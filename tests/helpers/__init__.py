"""What the tests share besides conftest.py's fixtures: corpora made on the fly, servers on loopback (S3,
HTTP(S)), the encoder exports of the eval and run-directory tests, and the DeepSpeed cases that run in a
process of their own (``python helpers/ds_cases.py CASE OUT.json`` from tests/)."""
