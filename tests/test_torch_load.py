"""core.torch_load on damaged files: whatever the bytes, one clear line (CorruptFileError), never torch's own exception text.
Every byte string is drawn from a seeded generator, so each run checks exactly the same files."""
import io, pickle, random, zipfile
import pytest, torch
from cxr_pggan.core import CorruptFileError, payload_digest, torch_load

CLEAR = 'is not a readable checkpoint (truncated or corrupt): '


def _check(path, want=None):
    "torch_load(path) fails with the one-line message (containing `want`), or returns the original content."
    try: obj = torch_load(path)
    except CorruptFileError as e:
        msg = str(e)
        assert msg.startswith(f'{path} {CLEAR}') and '\n' not in msg and msg.endswith('; copy it again or use another file'), msg
        if want: assert want in msg, msg
        return msg
    return obj


def _lengths(rng, n):
    "Lengths from 0 to 64 KiB, most of them short (where torch's errors vary most)."
    return [rng.choice([rng.randint(0, 16), rng.randint(0, 600), rng.randint(0, 5000), rng.randint(0, 65536)]) for _ in range(n)]


def test_random_bytes_are_not_a_torch_file(tmp_path):
    "2000 seeded random byte strings of varied lengths (the empty one included): each is 'not a torch file' (or empty)."
    rng = random.Random(20210101)
    for i, n in enumerate([0] + _lengths(rng, 1999)):
        p = tmp_path / f'r{i}.pt'; p.write_bytes(rng.randbytes(n))
        _check(p, 'the file is empty' if n == 0 else 'not a torch file')


@pytest.mark.filterwarnings('ignore::UserWarning')                     # torch warns about odd pickle protocols in garbage
@pytest.mark.parametrize('head', [b'PK\x03\x04', pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
                                  pickle.dumps(0x1950A86A20F9469CFC6C, protocol=0)], ids=['zip', 'legacy', 'legacy-proto0'])
def test_garbage_after_a_torch_signature(tmp_path, head):
    "Random bytes behind the start of a real torch file reach torch.load: every error still becomes the one line."
    rng = random.Random(len(head))
    for i, n in enumerate(_lengths(rng, 300)):
        p = tmp_path / f'g{i}.pt'; p.write_bytes(head + rng.randbytes(n))
        assert isinstance(_check(p), str), p                          # never loads


def _saved(**kw):
    ck = dict(w=torch.arange(12.).reshape(3, 4), meta={'name': 'x', 'n': 3}, **kw)
    buf = io.BytesIO(); torch.save(dict(ck, payload_sha256=payload_digest(ck)), buf)
    return ck, buf.getvalue()


def test_truncated_and_bit_flipped_checkpoints(tmp_path):
    """A real checksummed checkpoint cut at 300 seeded places and with 300 seeded bytes changed: each is refused in one line
    or (a change the format ignores, e.g. zip padding, or one in the checksum's own key name) loads its original content."""
    ck, b = _saved()
    rng = random.Random(7)
    loaded = 0
    for i in range(300):
        p = tmp_path / f't{i}.pt'; p.write_bytes(b[:rng.randrange(len(b))])
        assert isinstance(_check(p), str), p
    for i in range(300):
        bb = bytearray(b); k = rng.randrange(len(bb)); bb[k] = (bb[k] + rng.randrange(1, 256)) % 256
        p = tmp_path / f'f{i}.pt'; p.write_bytes(bytes(bb))
        got = _check(p)
        if not isinstance(got, str):
            loaded += 1
            # the one change that loads: a byte of the key `payload_sha256` itself, which then is a stray key, unverified
            odd = [x for x in got.keys() - ck.keys() if sum(a != b for a, b in zip(x, 'payload_sha256')) != 1]
            assert ck.keys() <= got.keys() and not odd and torch.equal(got['w'], ck['w']) and got['meta'] == ck['meta'], k
    assert loaded < 300                                                # the flips were seen: most are refused


def test_a_zip_that_is_not_torchs(tmp_path):
    p = tmp_path / 'z.pt'
    with zipfile.ZipFile(p, 'w') as z: z.writestr('hello.txt', 'not a checkpoint')
    assert isinstance(_check(p), str)


def test_the_clear_message_reaches_the_caller_unchanged(tmp_path):
    "The notebook's own example: fixed junk, an empty file, a cut file."
    p = tmp_path / 'rand.pt'; p.write_bytes(random.Random(0).randbytes(500))
    with pytest.raises(CorruptFileError, match='not a torch file'): torch_load(p, 'classifier checkpoint')
    (tmp_path / 'e.pt').write_bytes(b'')
    with pytest.raises(CorruptFileError, match='the file is empty'): torch_load(tmp_path / 'e.pt')
    _, b = _saved(); (tmp_path / 'cut.pt').write_bytes(b[:100])
    with pytest.raises(CorruptFileError, match='truncated or corrupt'): torch_load(tmp_path / 'cut.pt')
