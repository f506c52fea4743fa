"""How many decimal places each currency is floored to: a config value, in a module of its own so
that the reply parser and the store need none of the config's machinery (pydantic, YAML)."""

from collections.abc import Mapping
from decimal import ROUND_FLOOR, Context, Decimal

# Plenty for 19 fraction digits after a large integer part; Decimal's default (28) is not.
_DECIMAL_CONTEXT = Context(prec=80, rounding=ROUND_FLOOR)


class Precision:
    """Decimal places to floor each currency to; currencies are matched case-insensitively.

    A config value: the reply parser is handed one and floors every amount with it."""

    def __init__(self, places: Mapping[str, int], default_places: int) -> None:
        self._places = {currency.upper(): value for currency, value in places.items()}
        self.default_places = default_places
        # Each configured number of places as the quantum it floors to, made once: every
        # amount of every reply is floored.
        self._quanta = {value: Decimal(1).scaleb(-value)
                        for value in {*self._places.values(), default_places}}

    def places_for(self, currency: str) -> int:
        return self._places.get(currency.upper(), self.default_places)

    def floor(self, value: Decimal, currency: str) -> Decimal:
        return value.quantize(self._quanta[self.places_for(currency)], context=_DECIMAL_CONTEXT)
