"""What megatron-core needs from us across its versions (0.16.1 on Python 3.11, 0.19.x on 3.12).

Each difference lives in :mod:`.mcore`, named by the megatron-core API it concerns and detected by
that API's shape (a signature, an attribute), not by a version number scattered through the code.
"""
