"""QTIP's tail-biting bitshift trellis (`quant.trellis`): one stream of T k bits per tile of T weights
(TILE_COLS columns x T / TILE_COLS rows, row-major in the tile), one scale per row, block LDLQ over
blocks of TILE_COLS columns. Tensors: buffer `codes` uint8 (rows / tile rows, cols / TILE_COLS, T k / 8),
parameter `scale` (rows, 1). A code group is a whole tile's stream, re-encoded by a new Viterbi search."""
import torch

from engine import UserError

from ..ldlq import block_ldlq, two_sided_ldlq
from ..trellis import Trellis
from .base import Codebook, Quantized

TILE_COLS = 16  # trellis tiles: TILE_COLS columns (one block LDLQ block) x T / TILE_COLS rows


def trellis_tile(trellis, shape):
    """(tile rows, tile cols) of a `quant.trellis.Trellis` on a processed (rows, cols) matrix; UserError
    when the matrix does not split into whole tiles."""
    rows, cols = shape
    tx = trellis.T // TILE_COLS
    if trellis.T % TILE_COLS or rows % tx or cols % TILE_COLS:
        raise UserError(f"trellis sequences of T = {trellis.T} weights are tiles of {TILE_COLS} columns x T / "
                        f"{TILE_COLS} rows; the processed {rows}x{cols} matrix does not split into them")
    return tx, TILE_COLS


def trellis_quantize(W, H, trellis, blocksize=128, H_out=None):
    """QTIP's quantizer: block LDLQ of W (rows, cols) over blocks of 16 columns, each block's
    (rows, 16) target cut into tiles of T / 16 rows, every tile (row-major) one tail-biting trellis
    sequence, Viterbi-searched for all tiles of the block at once; one scale per row. With the output-side
    Hessian H_out (rows, rows), YAQA's two-sided LDLQ (`two_sided_ldlq`) with the tiles as its tiles: row
    blocks of T / 16 rows by 16 columns, the tiles of an anti-diagonal searched together.
    Returns (W_hat, streams uint8 (rows / tile rows, cols / 16, T k / 8), scale (rows, 1))."""
    tx, ty = trellis_tile(trellis, W.shape)
    s = trellis.scale_for(W, dim=1)

    def quantize_tiles(X, rows):  # X (n tx, ty): whole tiles, each one's tx rows together
        n = X.shape[0] // tx
        tiles = (X / s[rows]).reshape(n, tx * ty)  # row-major tile of tx rows of ty consecutive columns
        X_hat, packed = trellis.quantize(tiles)
        return X_hat.reshape(X.shape) * s[rows], packed

    if H_out is None:
        W_hat, codes = block_ldlq(W, H, lambda X: quantize_tiles(X, slice(None)), ty, -(-blocksize // ty) * ty)
        return W_hat, codes, s

    def round_tiles(X, rows, blocks):  # the stream of each tile, given to each of its rows
        X_hat, packed = quantize_tiles(X, rows)
        return X_hat, packed.repeat_interleave(tx, dim=0)

    W_hat, codes = two_sided_ldlq(W, H, H_out, round_tiles, ty, row_block=tx, whole_blocks=True)
    return W_hat, codes[::tx].contiguous(), s


class TrellisCodebook(Codebook):
    name = "trellis"
    costly_encode = True
    costly_decode = True

    def __init__(self):
        self._trellises = {}  # one Trellis (its code table) per option set

    def trellis(self, options):
        """The Trellis of a spec's `trellis` options (k included), built once."""
        key = tuple(sorted(options.items()))
        if key not in self._trellises:
            self._trellises[key] = Trellis(**options)
        return self._trellises[key]

    def quantize(self, Wp, H, wbits, options):
        recorded = dict(options.method.codebook_options, k=wbits)
        trellis = self.trellis(recorded)
        Wq, codes, scale = trellis_quantize(Wp, H, trellis, options.blocksize, options.h_out)
        return Quantized(Wq, codes, scale.float(), spec=dict(groupsize=-1, codebook=self.name, trellis=recorded,
                                                              tile=list(trellis_tile(trellis, Wp.shape))))

    def describe(self, method, qfn):
        return f"trellis {method.codebook_options}"

    def unit(self, method):
        return f"tiles of {method.codebook_options['T']} weights per trellis stream"

    def shapes(self, spec):
        rows, cols = spec["padded"]
        tr = self.trellis(spec["trellis"])
        tx, ty = spec["tile"]
        if tx * ty != tr.T or rows % tx or cols % ty:
            raise UserError(f"trellis layer spec: tiles {spec['tile']} do not hold T = {tr.T} weights of a "
                            f"{rows}x{cols} matrix")
        return {"codes": ((rows // tx, cols // ty, tr.T * tr.k // 8), torch.uint8), "scale": ((rows, 1), torch.float32)}

    def pack(self, spec, result):
        return {"codes": result.codes, "scale": result.scale.float()}

    def decode(self, layer, r0, r1):
        """Rows r0:r1: the tile rows that cover them are decoded, then cropped."""
        tr, tx = self.trellis(layer.spec["trellis"]), layer.spec["tile"][0]
        t0, t1 = r0 // tx, -(-r1 // tx)
        codes = layer.codes[t0:t1]
        W = self.untile(layer, tr.decode(codes.reshape(-1, codes.shape[-1])).reshape(*codes.shape[:2], -1))
        return W[r0 - t0 * tx:r1 - t0 * tx] * layer.scale[r0:r1]

    def _tiles(self, layer, r0, r1):
        tx = layer.spec["tile"][0]
        if r0 % tx or r1 % tx:
            raise UserError(f"trellis code groups are tiles of {tx} rows; rows {r0}:{r1} cut them")
        return r0 // tx, r1 // tx

    def tiles(self, layer, M):
        """(rows, cols) -> (tiles down, tiles across, T): each tile's weights in stream order."""
        (tx, ty), (rows, cols) = layer.spec["tile"], M.shape
        return M.reshape(rows // tx, tx, cols // ty, ty).transpose(1, 2).reshape(rows // tx, cols // ty, tx * ty)

    def untile(self, layer, tiles):
        """Inverse of `tiles`: (rows, cols)."""
        (tx, ty), (n, blocks) = layer.spec["tile"], tiles.shape[:2]
        return tiles.reshape(n, blocks, tx, ty).transpose(1, 2).reshape(n * tx, blocks * ty)

    def codes(self, layer, r0, r1):
        """The streams of the tiles of rows r0:r1 (whole tiles): uint8 (tiles down, tiles across, T k / 8)."""
        t0, t1 = self._tiles(layer, r0, r1)
        return layer.codes[t0:t1]

    def encode_tiles(self, layer, targets, scales):
        """(streams (m, T k / 8), values (m, T)): tiles `targets` (m, T, decode's units) coded anew under the
        per-weight row scales `scales` (m, T), by the tail-biting Viterbi search of quantization."""
        values, packed = self.trellis(layer.spec["trellis"]).quantize(targets.float() / scales)
        return packed, values * scales

    def encode(self, layer, target, r0, r1):
        """Every tile of `target` (rows r0:r1, whole tiles) coded anew under the layer's row scales."""
        self._tiles(layer, r0, r1)
        scale = layer.scale.detach()[r0:r1].expand_as(target)
        tiles, scales = self.tiles(layer, target), self.tiles(layer, scale)
        T = tiles.shape[-1]
        packed, values = self.encode_tiles(layer, tiles.reshape(-1, T), scales.reshape(-1, T))
        return packed.reshape(*tiles.shape[:2], -1), self.untile(layer, values.reshape(tiles.shape))

    def set_codes(self, layer, codes, r0, r1):
        t0, t1 = self._tiles(layer, r0, r1)
        layer.codes[t0:t1] = codes

    def kernel_layout(self, layer):
        tr, tile_rows = self.trellis(layer.spec["trellis"]), layer.spec["tile"][0]
        if tr.T * tr.k < 64:  # the kernel reads 8-byte windows of a stream
            return None
        # 1MAD's 1 / RMS: the kernel computes its values from the states (where that is exact); the other
        # codes' V values per state are gathered from the table, row-major
        return 2, tr.k, tile_rows, [tr.L, tr.T], [1 / tr.rms] if tr.code == "1mad" else [], tr.table.reshape(-1)

    def group_size(self, spec):
        return self.trellis(spec["trellis"]).T

    def group_rows(self, spec):
        return spec["tile"][0]

    def group_view(self, layer, M):
        tiles = self.tiles(layer, M)
        return tiles.reshape(-1, tiles.shape[-1])

    def encode_groups(self, layer, W, index, targets):
        """A Viterbi search per tile in `index` only."""
        rows, cols = layer.spec["padded"]
        scales = self.group_view(layer, layer.scale.detach().expand(rows, cols))
        return self.encode_tiles(layer, targets, scales[index])
