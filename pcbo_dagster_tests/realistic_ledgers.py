"""Realistically sized Stellar ledgers for tests and benchmarks: full transaction sets AND full
transaction metas (what makes a pubnet ledger ~400 KiB of XDR), for LedgerCloseMeta v0, v1 and v2.

A ledger holds `transactions` transactions of seven kinds, in a fixed rotation: classic payments,
offers that cross the order book, path payments through a liquidity pool, fee bumps, failed
transactions, and (v1 and v2 only: protocols 20+) Soroban token transfers and swaps with
authorization entries, footprints, contract events and contract-data changes. Each kind's envelope
and `TransactionResultMeta` (v0: TransactionMeta v2, v1: v3, v2: TransactionResultMetaV1 with
TransactionMeta v4) are built once with stellar-sdk's XDR types, holding numbered 32-byte markers
where keys, hashes and signatures go; every transaction of every ledger then gets its own bytes in
their place (SHAKE-256 of the ledger sequence, transaction index and marker: deterministic, no
random module, no clock, and as incompressible as real keys). About 2 KiB of XDR a transaction.

`write_realistic_archive(root, ledgers=..., transactions=..., ledgers_per_file=...)` writes a SEP-54
archive of such ledgers, one zstd batch file per `ledgers_per_file`, headers chained as stellar-core
chains them and naming the hashes of their transaction sets and of their results (`txProcessing`'s,
in its order, the apply order), and returns a summary (sizes, and each ledger's counts for checking).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import zstandard
from stellar_sdk import xdr as x

from pcbo_dagster.sources.ledger_archives import batch_name, partition_name
from pcbo_dagster_tests.ledger_archive_builder import (
    GENESIS_CLOSE_TIME,
    ledger_header,
    tx_result_set_hash,
    tx_set_hash,
)

#: What `write_realistic_archive` writes, for a generated archive's marker (`ledger_benchmark.py`): 2
#: since each header names its results' hash (`txSetResultHash`), which pcbo checks (1: zeros).
ARCHIVE_FORMAT = 2
PROTOCOL_OF_VERSION = {0: 19, 1: 22, 2: 23}
CLOSE_SECONDS = 6
FIRST_LEDGER = 50_000_000
_MARK = b"\xa5\x5a\xc3\x3c"


def _marker(number: int) -> bytes:
    return _MARK + struct.pack(">I", number) + _MARK * 6


class _Markers:
    """Numbered placeholders: `key()` a fresh 32-byte one, `signature()` a 64-byte pair."""

    def __init__(self) -> None:
        self.count = 0

    def key(self) -> bytes:
        self.count += 1
        return _marker(self.count)

    def signature(self) -> bytes:
        return self.key() + self.key()


# -- XDR building blocks ----------------------------------------------------------------------------


def _i64(value: int) -> x.Int64:
    return x.Int64(value)


def _u32(value: int) -> x.Uint32:
    return x.Uint32(value)


def _account(key: bytes) -> x.AccountID:
    return x.AccountID(x.PublicKey(x.PublicKeyType.PUBLIC_KEY_TYPE_ED25519, x.Uint256(key)))


def _muxed(key: bytes) -> x.MuxedAccount:
    return x.MuxedAccount(x.CryptoKeyType.KEY_TYPE_ED25519, ed25519=x.Uint256(key))


def _native() -> x.Asset:
    return x.Asset(x.AssetType.ASSET_TYPE_NATIVE)


def _credit(code: bytes, issuer: bytes) -> x.Asset:
    return x.Asset(
        x.AssetType.ASSET_TYPE_CREDIT_ALPHANUM4, alpha_num4=x.AlphaNum4(x.AssetCode4(code), _account(issuer))
    )


def _trustline_asset(asset: x.Asset) -> x.TrustLineAsset:
    return x.TrustLineAsset(asset.type, alpha_num4=asset.alpha_num4)


def _entry(data: x.LedgerEntryData, seq: int = 49_999_000) -> x.LedgerEntry:
    return x.LedgerEntry(_u32(seq), data, x.LedgerEntryExt(0))


def _account_entry(key: bytes, balance: int, seq_num: int) -> x.LedgerEntry:
    ext = x.AccountEntryExt(
        1,
        v1=x.AccountEntryExtensionV1(
            x.Liabilities(_i64(balance // 10), _i64(balance // 20)), x.AccountEntryExtensionV1Ext(0)
        ),
    )
    account = x.AccountEntry(
        _account(key), _i64(balance), x.SequenceNumber(_i64(seq_num)), _u32(4), None, _u32(0),
        x.String32(b""), x.Thresholds(b"\x01\x00\x00\x00"), [], ext,
    )  # fmt: skip
    return _entry(x.LedgerEntryData(x.LedgerEntryType.ACCOUNT, account=account))


def _trustline_entry(key: bytes, asset: x.Asset, balance: int) -> x.LedgerEntry:
    ext = x.TrustLineEntryExt(
        1, v1=x.TrustLineEntryV1(x.Liabilities(_i64(0), _i64(balance // 3)), x.TrustLineEntryV1Ext(0))
    )
    line = x.TrustLineEntry(_account(key), _trustline_asset(asset), _i64(balance), _i64(2**62), _u32(1), ext)
    return _entry(x.LedgerEntryData(x.LedgerEntryType.TRUSTLINE, trust_line=line))


def _offer_entry(key: bytes, offer_id: int, selling: x.Asset, buying: x.Asset, amount: int) -> x.LedgerEntry:
    offer = x.OfferEntry(
        _account(key), _i64(offer_id), selling, buying, _i64(amount),
        x.Price(x.Int32(1_234), x.Int32(1_000)), _u32(0), x.OfferEntryExt(0),
    )  # fmt: skip
    return _entry(x.LedgerEntryData(x.LedgerEntryType.OFFER, offer=offer))


def _pool_entry(pool: bytes, a: x.Asset, b: x.Asset) -> x.LedgerEntry:
    product = x.LiquidityPoolEntryConstantProduct(
        x.LiquidityPoolConstantProductParameters(a, b, x.Int32(30)),
        _i64(9_000_000_000), _i64(4_500_000_000), _i64(6_000_000_000), _i64(812),
    )  # fmt: skip
    body = x.LiquidityPoolEntryBody(
        x.LiquidityPoolType.LIQUIDITY_POOL_CONSTANT_PRODUCT, constant_product=product
    )
    return _entry(
        x.LedgerEntryData(
            x.LedgerEntryType.LIQUIDITY_POOL,
            liquidity_pool=x.LiquidityPoolEntry(x.PoolID(x.Hash(pool)), body),
        )
    )


def _changes(*entries: x.LedgerEntry) -> list[x.LedgerEntryChange]:
    """Each entry as state then updated, as stellar-core writes a modified entry."""
    out = []
    for entry in entries:
        out.append(x.LedgerEntryChange(x.LedgerEntryChangeType.LEDGER_ENTRY_STATE, state=entry))
        out.append(x.LedgerEntryChange(x.LedgerEntryChangeType.LEDGER_ENTRY_UPDATED, updated=entry))
    return out


def _sym(name: bytes) -> x.SCVal:
    return x.SCVal(x.SCValType.SCV_SYMBOL, sym=x.SCSymbol(name))


def _sc_address(key: bytes, contract: bool = False) -> x.SCAddress:
    if contract:
        return x.SCAddress(x.SCAddressType.SC_ADDRESS_TYPE_CONTRACT, contract_id=x.ContractID(x.Hash(key)))
    return x.SCAddress(x.SCAddressType.SC_ADDRESS_TYPE_ACCOUNT, account_id=_account(key))


def _address(key: bytes, contract: bool = False) -> x.SCVal:
    return x.SCVal(x.SCValType.SCV_ADDRESS, address=_sc_address(key, contract))


def _i128(value: int) -> x.SCVal:
    return x.SCVal(x.SCValType.SCV_I128, i128=x.Int128Parts(_i64(0), x.Uint64(value)))


def _map(pairs: list[tuple[x.SCVal, x.SCVal]]) -> x.SCVal:
    return x.SCVal(x.SCValType.SCV_MAP, map=x.SCMap([x.SCMapEntry(k, v) for k, v in pairs]))


def _vec(values: list[x.SCVal]) -> x.SCVal:
    return x.SCVal(x.SCValType.SCV_VEC, vec=x.SCVec(values))


def _balance_entry(contract: bytes, holder: bytes, amount: int) -> x.LedgerEntry:
    value = _map(
        [
            (_sym(b"amount"), _i128(amount)),
            (_sym(b"authorized"), x.SCVal(x.SCValType.SCV_BOOL, b=True)),
            (_sym(b"clawback"), x.SCVal(x.SCValType.SCV_BOOL, b=False)),
        ]
    )
    data = x.ContractDataEntry(
        x.ExtensionPoint(0),
        _sc_address(contract, contract=True),
        _vec([_sym(b"Balance"), _address(holder)]),
        x.ContractDataDurability.PERSISTENT,
        value,
    )
    return _entry(x.LedgerEntryData(x.LedgerEntryType.CONTRACT_DATA, contract_data=data))


def _ttl_entry(key_hash: bytes) -> x.LedgerEntry:
    return _entry(
        x.LedgerEntryData(x.LedgerEntryType.TTL, ttl=x.TTLEntry(x.Hash(key_hash), _u32(52_000_000)))
    )


def _contract_data_key(contract: bytes, holder: bytes) -> x.LedgerKey:
    return x.LedgerKey(
        x.LedgerEntryType.CONTRACT_DATA,
        contract_data=x.LedgerKeyContractData(
            _sc_address(contract, contract=True),
            _vec([_sym(b"Balance"), _address(holder)]),
            x.ContractDataDurability.PERSISTENT,
        ),
    )


def _event(contract: bytes, topics: list[x.SCVal], data: x.SCVal) -> x.ContractEvent:
    return x.ContractEvent(
        x.ExtensionPoint(0),
        x.ContractID(x.Hash(contract)),
        x.ContractEventType.CONTRACT,
        x.ContractEventBody(0, v0=x.ContractEventV0(topics, data)),
    )


def _signatures(m: _Markers, count: int = 1) -> list[x.DecoratedSignature]:
    return [
        x.DecoratedSignature(x.SignatureHint(m.key()[:4]), x.Signature(m.signature())) for _ in range(count)
    ]


def _transaction(
    m: _Markers, source: bytes, operations: list[x.Operation], ext: x.TransactionExt | None = None
) -> x.Transaction:
    cond = x.Preconditions(
        x.PreconditionType.PRECOND_TIME,
        time_bounds=x.TimeBounds(x.TimePoint(x.Uint64(0)), x.TimePoint(x.Uint64(1_900_000_000))),
    )
    memo = x.Memo(x.MemoType.MEMO_ID, id=x.Uint64(1_234_567))
    return x.Transaction(
        _muxed(source), _u32(100 * len(operations)), x.SequenceNumber(_i64(2**40)), cond, memo, operations,
        ext or x.TransactionExt(0),
    )  # fmt: skip


def _envelope(m: _Markers, tx: x.Transaction, signatures: int = 1) -> x.TransactionEnvelope:
    return x.TransactionEnvelope(
        x.EnvelopeType.ENVELOPE_TYPE_TX, v1=x.TransactionV1Envelope(tx, _signatures(m, signatures))
    )


def _op_result(tr: x.OperationResultTr) -> x.OperationResult:
    return x.OperationResult(x.OperationResultCode.opINNER, tr=tr)


def _tx_result(
    code: x.TransactionResultCode, results: list[x.OperationResult], fee: int = 100
) -> x.TransactionResult:
    return x.TransactionResult(
        _i64(fee), x.TransactionResultResult(code, results=results), x.TransactionResultExt(0)
    )


# -- the kinds of transaction -----------------------------------------------------------------------


@dataclass
class _Parts:
    envelope: x.TransactionEnvelope
    result: x.TransactionResult
    fee_changes: list[x.LedgerEntryChange]
    before: list[x.LedgerEntryChange]
    operations: list[list[x.LedgerEntryChange]]  # one list of changes per operation
    soroban: bool = False
    events: list[x.ContractEvent] = field(default_factory=list)
    return_value: x.SCVal | None = None
    operation_count: int = 1


def _payments(m: _Markers) -> _Parts:
    source, usd_issuer = m.key(), m.key()
    usd = _credit(b"USDC", usd_issuer)
    destinations = [m.key()]
    ops = [
        x.Operation(
            None,
            x.OperationBody(x.OperationType.PAYMENT, payment_op=x.PaymentOp(_muxed(d), usd, _i64(5_000_000))),
        )
        for d in destinations
    ]
    result = _tx_result(
        x.TransactionResultCode.txSUCCESS,
        [
            _op_result(
                x.OperationResultTr(
                    x.OperationType.PAYMENT,
                    payment_result=x.PaymentResult(x.PaymentResultCode.PAYMENT_SUCCESS),
                )
            )
            for _ in ops
        ],
    )
    account = _account_entry(source, 90_000_000_000, 2**40)
    return _Parts(
        _envelope(m, _transaction(m, source, ops)),
        result,
        _changes(account),
        _changes(account),
        [
            _changes(_trustline_entry(source, usd, 10**12), _trustline_entry(d, usd, 10**10))
            for d in destinations
        ],
        operation_count=len(ops),
    )


def _offer(m: _Markers) -> _Parts:
    source, issuer, maker = m.key(), m.key(), m.key()
    usd = _credit(b"USDC", issuer)
    op = x.Operation(
        None,
        x.OperationBody(
            x.OperationType.MANAGE_SELL_OFFER,
            manage_sell_offer_op=x.ManageSellOfferOp(
                _native(), usd, _i64(10**9), x.Price(x.Int32(10), x.Int32(123)), _i64(0)
            ),
        ),
    )
    claimed = [
        x.ClaimAtom(
            x.ClaimAtomType.CLAIM_ATOM_TYPE_ORDER_BOOK,
            order_book=x.ClaimOfferAtom(
                _account(maker), _i64(77_000 + k), usd, _i64(10**6), _native(), _i64(10**7)
            ),
        )
        for k in range(1)
    ]
    offer = _offer_entry(source, 99_001, _native(), usd, 10**9)
    success = x.ManageOfferSuccessResult(
        claimed,
        x.ManageOfferSuccessResultOffer(x.ManageOfferEffect.MANAGE_OFFER_CREATED, offer=offer.data.offer),
    )
    result = _tx_result(
        x.TransactionResultCode.txSUCCESS,
        [
            _op_result(
                x.OperationResultTr(
                    x.OperationType.MANAGE_SELL_OFFER,
                    manage_sell_offer_result=x.ManageSellOfferResult(
                        x.ManageSellOfferResultCode.MANAGE_SELL_OFFER_SUCCESS, success=success
                    ),
                )
            )
        ],
    )
    account = _account_entry(source, 50_000_000_000, 2**40)
    maker_offers = [_offer_entry(maker, 77_000 + k, usd, _native(), 10**8) for k in range(1)]
    changes = _changes(
        account, _trustline_entry(source, usd, 10**11), _account_entry(maker, 10**11, 2**41), *maker_offers
    )
    changes.append(x.LedgerEntryChange(x.LedgerEntryChangeType.LEDGER_ENTRY_CREATED, created=offer))
    return _Parts(
        _envelope(m, _transaction(m, source, [op])), result, _changes(account), _changes(account), [changes]
    )


def _path_payment(m: _Markers) -> _Parts:
    source, issuer, destination, pool = m.key(), m.key(), m.key(), m.key()
    usd, eur = _credit(b"USDC", issuer), _credit(b"EURC", issuer)
    op = x.Operation(
        None,
        x.OperationBody(
            x.OperationType.PATH_PAYMENT_STRICT_RECEIVE,
            path_payment_strict_receive_op=x.PathPaymentStrictReceiveOp(
                usd, _i64(10**8), _muxed(destination), eur, _i64(9 * 10**7), [_native()]
            ),
        ),
    )
    atoms = [
        x.ClaimAtom(
            x.ClaimAtomType.CLAIM_ATOM_TYPE_LIQUIDITY_POOL,
            liquidity_pool=x.ClaimLiquidityAtom(
                x.PoolID(x.Hash(pool)), _native(), _i64(10**8), usd, _i64(10**7)
            ),
        ),
        x.ClaimAtom(
            x.ClaimAtomType.CLAIM_ATOM_TYPE_LIQUIDITY_POOL,
            liquidity_pool=x.ClaimLiquidityAtom(
                x.PoolID(x.Hash(m.key())), eur, _i64(9 * 10**7), _native(), _i64(10**8)
            ),
        ),
    ]
    success = x.PathPaymentStrictReceiveResultSuccess(
        atoms, x.SimplePaymentResult(_account(destination), eur, _i64(9 * 10**7))
    )
    result = _tx_result(
        x.TransactionResultCode.txSUCCESS,
        [
            _op_result(
                x.OperationResultTr(
                    x.OperationType.PATH_PAYMENT_STRICT_RECEIVE,
                    path_payment_strict_receive_result=x.PathPaymentStrictReceiveResult(
                        x.PathPaymentStrictReceiveResultCode.PATH_PAYMENT_STRICT_RECEIVE_SUCCESS,
                        success=success,
                    ),
                )
            )
        ],
    )
    account = _account_entry(source, 20_000_000_000, 2**40)
    changes = _changes(
        _trustline_entry(source, usd, 10**11), _trustline_entry(destination, eur, 10**9),
        _pool_entry(pool, _native(), usd), _pool_entry(m.key(), eur, _native()),
    )  # fmt: skip
    return _Parts(
        _envelope(m, _transaction(m, source, [op])), result, _changes(account), _changes(account), [changes]
    )


def _fee_bump(m: _Markers) -> _Parts:
    inner = _payments(m)
    sponsor = m.key()
    assert inner.envelope.v1 is not None
    bump = x.FeeBumpTransaction(
        _muxed(sponsor), _i64(400),
        x.FeeBumpTransactionInnerTx(x.EnvelopeType.ENVELOPE_TYPE_TX, v1=inner.envelope.v1),
        x.FeeBumpTransactionExt(0),
    )  # fmt: skip
    envelope = x.TransactionEnvelope(
        x.EnvelopeType.ENVELOPE_TYPE_TX_FEE_BUMP, fee_bump=x.FeeBumpTransactionEnvelope(bump, _signatures(m))
    )
    assert inner.result.result.results is not None
    inner_result = x.InnerTransactionResult(
        _i64(200),
        x.InnerTransactionResultResult(
            x.TransactionResultCode.txSUCCESS, results=inner.result.result.results
        ),
        x.InnerTransactionResultExt(0),
    )
    result = x.TransactionResult(
        _i64(400),
        x.TransactionResultResult(
            x.TransactionResultCode.txFEE_BUMP_INNER_SUCCESS,
            inner_result_pair=x.InnerTransactionResultPair(x.Hash(m.key()), inner_result),
        ),
        x.TransactionResultExt(0),
    )
    sponsor_account = _account_entry(sponsor, 10**12, 2**42)
    return _Parts(
        envelope, result, _changes(sponsor_account), inner.before, inner.operations,
        operation_count=inner.operation_count,
    )  # fmt: skip


def _failed(m: _Markers) -> _Parts:
    source, issuer = m.key(), m.key()
    usd = _credit(b"USDC", issuer)
    op = x.Operation(
        None,
        x.OperationBody(
            x.OperationType.MANAGE_SELL_OFFER,
            manage_sell_offer_op=x.ManageSellOfferOp(
                usd, _native(), _i64(10**12), x.Price(x.Int32(1), x.Int32(9)), _i64(0)
            ),
        ),
    )
    result = _tx_result(
        x.TransactionResultCode.txFAILED,
        [
            _op_result(
                x.OperationResultTr(
                    x.OperationType.MANAGE_SELL_OFFER,
                    manage_sell_offer_result=x.ManageSellOfferResult(
                        x.ManageSellOfferResultCode.MANAGE_SELL_OFFER_UNDERFUNDED
                    ),
                )
            )
        ],
    )
    account = _account_entry(source, 10**9, 2**40)
    return _Parts(
        _envelope(m, _transaction(m, source, [op])), result, _changes(account), _changes(account), [[]]
    )


def _soroban(m: _Markers, swap: bool) -> _Parts:
    source, token, other_token, to = m.key(), m.key(), m.key(), m.key()
    contract = m.key() if swap else token
    function = b"swap" if swap else b"transfer"
    args = [_address(source), _address(to), _i128(25_000_000)]
    if swap:
        args += [_address(token, contract=True), _address(other_token, contract=True), _i128(24_000_000)]
    invoke = x.InvokeContractArgs(_sc_address(contract, contract=True), x.SCSymbol(function), args)
    nested = [
        x.SorobanAuthorizedInvocation(
            x.SorobanAuthorizedFunction(
                x.SorobanAuthorizedFunctionType.SOROBAN_AUTHORIZED_FUNCTION_TYPE_CONTRACT_FN,
                contract_fn=x.InvokeContractArgs(
                    _sc_address(token, contract=True), x.SCSymbol(b"transfer"), args[:3]
                ),
            ),
            [],
        )
    ] if swap else []  # fmt: skip
    public_key = x.SCVal(x.SCValType.SCV_BYTES, bytes=x.SCBytes(m.key()))
    signed = x.SCVal(x.SCValType.SCV_BYTES, bytes=x.SCBytes(m.signature()))
    signature = _vec([_map([(_sym(b"public_key"), public_key), (_sym(b"signature"), signed)])])
    auth = x.SorobanAuthorizationEntry(
        x.SorobanCredentials(
            x.SorobanCredentialsType.SOROBAN_CREDENTIALS_ADDRESS,
            address=x.SorobanAddressCredentials(
                _sc_address(source), _i64(8_812_345), _u32(50_100_000), signature
            ),
        ),
        x.SorobanAuthorizedInvocation(
            x.SorobanAuthorizedFunction(
                x.SorobanAuthorizedFunctionType.SOROBAN_AUTHORIZED_FUNCTION_TYPE_CONTRACT_FN,
                contract_fn=invoke,
            ),
            nested,
        ),
    )
    holders = [source, to] + ([m.key(), m.key()] if swap else [])
    tokens = [token, token] + ([other_token, other_token] if swap else [])
    instance = x.LedgerKey(
        x.LedgerEntryType.CONTRACT_DATA,
        contract_data=x.LedgerKeyContractData(
            _sc_address(contract, contract=True),
            x.SCVal(x.SCValType.SCV_LEDGER_KEY_CONTRACT_INSTANCE),
            x.ContractDataDurability.PERSISTENT,
        ),
    )
    code = x.LedgerKey(
        x.LedgerEntryType.CONTRACT_CODE, contract_code=x.LedgerKeyContractCode(x.Hash(m.key()))
    )
    footprint = x.LedgerFootprint(
        [instance, code], [_contract_data_key(t, h) for t, h in zip(tokens, holders, strict=True)]
    )
    data = x.SorobanTransactionData(
        x.SorobanTransactionDataExt(0),
        x.SorobanResources(footprint, _u32(3_000_000), _u32(9_000), _u32(600)),
        _i64(90_000),
    )
    op = x.Operation(
        None,
        x.OperationBody(
            x.OperationType.INVOKE_HOST_FUNCTION,
            invoke_host_function_op=x.InvokeHostFunctionOp(
                x.HostFunction(x.HostFunctionType.HOST_FUNCTION_TYPE_INVOKE_CONTRACT, invoke_contract=invoke),
                [auth],
            ),
        ),
    )
    envelope = _envelope(m, _transaction(m, source, [op], x.TransactionExt(1, soroban_data=data)))
    result = _tx_result(
        x.TransactionResultCode.txSUCCESS,
        [
            _op_result(
                x.OperationResultTr(
                    x.OperationType.INVOKE_HOST_FUNCTION,
                    invoke_host_function_result=x.InvokeHostFunctionResult(
                        x.InvokeHostFunctionResultCode.INVOKE_HOST_FUNCTION_SUCCESS, success=x.Hash(m.key())
                    ),
                )
            )
        ],
        fee=95_000,
    )
    account = _account_entry(source, 3 * 10**10, 2**40)
    balances = [_balance_entry(t, h, 10**9 + k) for k, (t, h) in enumerate(zip(tokens, holders, strict=True))]
    changes = _changes(*balances)
    changes += [
        x.LedgerEntryChange(x.LedgerEntryChangeType.LEDGER_ENTRY_STATE, state=_ttl_entry(m.key()))
        for _ in balances
    ]
    asset_name = x.SCVal(x.SCValType.SCV_STRING, str=x.SCString(b"USDC:" + b"G" * 56))
    events = [
        _event(
            t,
            [_sym(b"transfer"), _address(h), _address(holders[(k + 1) % len(holders)]), asset_name],
            _i128(25),
        )
        for k, (t, h) in enumerate(zip(tokens, holders, strict=True))
        if k % 2 == 0
    ]
    return _Parts(
        envelope, result, _changes(account), _changes(account), [changes], soroban=True, events=events,
        return_value=_i128(24_500_000) if swap else x.SCVal(x.SCValType.SCV_VOID),
    )  # fmt: skip


_CLASSIC_ROTATION = (
    "offer",
    "payments",
    "offer",
    "path",
    "offer",
    "failed",
    "payments",
    "fee_bump",
    "offer",
    "path",
)
_SOROBAN_ROTATION = (
    "offer",
    "transfer",
    "payments",
    "offer",
    "swap",
    "path",
    "offer",
    "failed",
    "payments",
    "fee_bump",
)


def _parts(kind: str, m: _Markers) -> _Parts:
    builders = {
        "payments": _payments, "offer": _offer, "path": _path_payment, "fee_bump": _fee_bump,
        "failed": _failed,
        "transfer": lambda m: _soroban(m, swap=False), "swap": lambda m: _soroban(m, swap=True),
    }  # fmt: skip
    return builders[kind](m)


def _result_meta(parts: _Parts, version: int, pair: x.TransactionResultPair) -> bytes:
    fee = x.LedgerEntryChanges(parts.fee_changes)
    before = x.LedgerEntryChanges(parts.before)
    after = x.LedgerEntryChanges([])
    if version == 0:
        meta = x.TransactionMeta(
            2,
            v2=x.TransactionMetaV2(
                before, [x.OperationMeta(x.LedgerEntryChanges(c)) for c in parts.operations], after
            ),
        )
        return x.TransactionResultMeta(pair, fee, meta).to_xdr_bytes()
    soroban_ext = x.SorobanTransactionMetaExt(
        1, v1=x.SorobanTransactionMetaExtV1(x.ExtensionPoint(0), _i64(60_000), _i64(30_000), _i64(1_200))
    )
    if version == 1:
        soroban = None
        if parts.soroban:
            assert parts.return_value is not None
            soroban = x.SorobanTransactionMeta(soroban_ext, parts.events, parts.return_value, [])
        meta = x.TransactionMeta(
            3,
            v3=x.TransactionMetaV3(
                x.ExtensionPoint(0), before,
                [x.OperationMeta(x.LedgerEntryChanges(c)) for c in parts.operations], after, soroban,
            ),
        )  # fmt: skip
        return x.TransactionResultMeta(pair, fee, meta).to_xdr_bytes()
    operations = [
        x.OperationMetaV2(x.ExtensionPoint(0), x.LedgerEntryChanges(c), parts.events if parts.soroban else [])
        for c in parts.operations
    ]
    fee_event = x.TransactionEvent(
        x.TransactionEventStage.TRANSACTION_EVENT_STAGE_BEFORE_ALL_TXS,
        _event(
            _NATIVE_CONTRACT,
            [
                _sym(b"fee"),
                _address(parts.fee_changes[0].state.data.account.account_id.account_id.ed25519.uint256),  # type: ignore[union-attr]
            ],
            _i128(100),
        ),
    )
    soroban2 = x.SorobanTransactionMetaV2(soroban_ext, parts.return_value) if parts.soroban else None
    meta = x.TransactionMeta(
        4, v4=x.TransactionMetaV4(x.ExtensionPoint(0), before, operations, after, soroban2, [fee_event], [])
    )
    refund = x.LedgerEntryChanges(parts.fee_changes if parts.soroban else [])
    return x.TransactionResultMetaV1(x.ExtensionPoint(0), pair, fee, meta, refund).to_xdr_bytes()


_NATIVE_CONTRACT = hashlib.sha256(b"native asset contract").digest()


@dataclass(frozen=True)
class _Template:
    """One kind of transaction as XDR pieces with numbered markers between them."""

    kind: str
    soroban: bool
    operation_count: int
    envelope: tuple[list[bytes], list[int]]  # the pieces, and the marker number after each but the last
    meta: tuple[list[bytes], list[int]]
    pair: tuple[list[bytes], list[int]]  # its TransactionResultPair (in its meta)
    markers: int

    def fill(self, part: tuple[list[bytes], list[int]], values: list[bytes]) -> bytes:
        pieces, numbers = part
        out = [pieces[0]]
        for piece, number in zip(pieces[1:], numbers, strict=True):
            out.append(values[number - 1])
            out.append(piece)
        return b"".join(out)


def _split(data: bytes, count: int) -> tuple[list[bytes], list[int]]:
    pieces: list[bytes] = []
    numbers: list[int] = []
    piece_start = search = 0
    while (at := data.find(_MARK, search)) >= 0:
        number = struct.unpack(">I", data[at + 4 : at + 8])[0]
        if 1 <= number <= count and data[at : at + 32] == _marker(number):
            pieces.append(data[piece_start:at])
            numbers.append(number)
            piece_start = search = at + 32
        else:
            search = at + 1
    pieces.append(data[piece_start:])
    return pieces, numbers


@cache
def _templates(version: int) -> tuple[_Template, ...]:
    rotation = _CLASSIC_ROTATION if version == 0 else _SOROBAN_ROTATION
    out = []
    for kind in rotation:
        m = _Markers()
        parts = _parts(kind, m)
        pair_hash = m.key()
        pair = x.TransactionResultPair(x.Hash(pair_hash), parts.result)
        envelope = parts.envelope.to_xdr_bytes()
        meta = _result_meta(parts, version, pair)
        out.append(
            _Template(
                kind,
                parts.soroban,
                parts.operation_count,
                _split(envelope, m.count),
                _split(meta, m.count),
                _split(pair.to_xdr_bytes(), m.count),
                m.count,
            )
        )
    return tuple(out)


# -- ledgers ----------------------------------------------------------------------------------------


def _component_phase(envelopes: list[bytes]) -> bytes:
    """TransactionPhase v0 holding one TXSET_COMP_TXS_MAYBE_DISCOUNTED_FEE component (base fee 100)."""
    count = struct.Struct(">I")
    head = count.pack(0) + count.pack(1) + count.pack(0) + count.pack(1) + struct.pack(">q", 100)
    return head + count.pack(len(envelopes)) + b"".join(envelopes)


@dataclass
class RealisticLedger:
    sequence: int
    ledger_hash: bytes
    previous_hash: bytes
    close_time: int
    protocol: int
    transaction_count: int
    operation_count: int
    xdr: bytes


def realistic_ledger(
    sequence: int, previous_hash: bytes, *, transactions: int = 200, version: int = 2
) -> RealisticLedger:
    """One LedgerCloseMeta of `version` with `transactions` transactions and their metas."""
    templates = _templates(version)
    envelopes: list[list[bytes]] = [[], []]  # classic, Soroban
    metas: list[bytes] = []
    pairs: list[bytes] = []  # their results, in apply order (txProcessing's)
    operations = 0
    for t in range(transactions):
        template = templates[(sequence + t) % len(templates)]
        values = hashlib.shake_256(b"%d/%d" % (sequence, t)).digest(32 * template.markers)
        keys = [values[32 * k : 32 * k + 32] for k in range(template.markers)]
        envelopes[template.soroban].append(template.fill(template.envelope, keys))
        metas.append(template.fill(template.meta, keys))
        pairs.append(template.fill(template.pair, keys))
        operations += template.operation_count
    protocol = PROTOCOL_OF_VERSION[version]
    close_time = GENESIS_CLOSE_TIME + (sequence - FIRST_LEDGER) * CLOSE_SECONDS
    count = struct.Struct(">I")
    if version == 0:
        tx_set = previous_hash + count.pack(len(envelopes[0])) + b"".join(envelopes[0])
    else:
        phases = [_component_phase(envelopes[0])]
        if version == 1:  # protocols 20-22: the Soroban phase is also a component list
            phases.append(_component_phase(envelopes[1]))
        else:  # protocol 23: a parallel phase, its transactions in two stages of one cluster each
            half = len(envelopes[1]) // 2
            stages = [envelopes[1][:half], envelopes[1][half:]]
            phases.append(
                count.pack(1) + count.pack(1) + struct.pack(">q", 100) + count.pack(len(stages))
                + b"".join(count.pack(1) + count.pack(len(s)) + b"".join(s) for s in stages)
            )  # fmt: skip
        tx_set = count.pack(1) + previous_hash + count.pack(len(phases)) + b"".join(phases)
    header = ledger_header(
        sequence,
        previous_hash,
        close_time,
        protocol,
        tx_set_hash(tx_set, legacy=version == 0),
        tx_result_set_hash(pairs),
    )
    header_xdr = header.to_xdr_bytes()
    ledger_hash = hashlib.sha256(header_xdr).digest()
    entry = x.LedgerHeaderHistoryEntry(
        x.Hash(ledger_hash), header, x.LedgerHeaderHistoryEntryExt(0)
    ).to_xdr_bytes()
    processing = count.pack(len(metas)) + b"".join(metas)
    empty = count.pack(0)
    if version == 0:
        body = entry + tx_set + processing + empty + empty
    else:
        evicted = b""
        if version == 2:
            evicted = x.LedgerKey(
                x.LedgerEntryType.TTL, ttl=x.LedgerKeyTtl(x.Hash(hashlib.sha256(b"%d" % sequence).digest()))
            ).to_xdr_bytes()
        tail = struct.pack(">Q", 123_456_789) + count.pack(1 if evicted else 0) + evicted
        body = empty + entry + tx_set + processing + empty + empty + tail + (empty if version == 1 else b"")
    xdr = count.pack(version) + body
    return RealisticLedger(
        sequence, ledger_hash, previous_hash, close_time, protocol, transactions, operations, xdr
    )


@dataclass
class RealisticArchive:
    root: Path
    first: int
    end: int
    files: int = 0
    xdr_bytes: int = 0
    stored_bytes: int = 0
    ledgers: dict[int, RealisticLedger] = field(default_factory=dict)  # kept only when asked


def write_realistic_archive(
    root: Path,
    *,
    ledgers: int,
    transactions: int = 200,
    ledgers_per_file: int = 1,
    files_per_partition: int = 64_000,
    version: int = 2,
    first: int = FIRST_LEDGER,
    keep: bool = False,
) -> RealisticArchive:
    """Write `ledgers` realistic ledgers from `first` as a SEP-54 archive under `root` (partition
    folders of `files_per_partition` batch files, as Galexie's pubnet config: 64,000 one-ledger files)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = RealisticArchive(root, first, first + ledgers)
    compressor = zstandard.ZstdCompressor(level=3)
    previous = hashlib.sha256(b"before %d" % first).digest()
    partition_size = ledgers_per_file * files_per_partition
    for batch_start in range(first, first + ledgers, ledgers_per_file):
        batch_end = min(batch_start + ledgers_per_file, first + ledgers) - 1
        metas = []
        for sequence in range(batch_start, batch_end + 1):
            ledger = realistic_ledger(sequence, previous, transactions=transactions, version=version)
            previous = ledger.ledger_hash
            metas.append(ledger.xdr)
            archive.xdr_bytes += len(ledger.xdr)
            if keep:
                archive.ledgers[sequence] = ledger
        data = struct.pack(">III", batch_start, batch_end, len(metas)) + b"".join(metas)
        p_start = batch_start - batch_start % partition_size
        folder = root / partition_name(p_start, p_start + partition_size - 1)
        folder.mkdir(exist_ok=True)
        compressed = compressor.compress(data)
        (folder / batch_name(batch_start, batch_end)).write_bytes(compressed)
        archive.files += 1
        archive.stored_bytes += len(compressed)
    return archive
