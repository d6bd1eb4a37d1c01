"""What the synthetic clickstream looks like: one strict, frozen model, so a typo fails loudly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from streamrec.events import Region

DEFAULT_REGIONS: tuple[str, ...] = ("us-east-1", "eu-west-1")


def floor_to_hour(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class GeneratorConfig(BaseModel):
    """Knobs of :func:`streamrec.clickstream.generate.generate`: the same config gives the same bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 42
    regions: tuple[Region, ...] = DEFAULT_REGIONS
    # Each region has its own users; the item catalogue is shared (one shop, several regions).
    users_per_region: int = Field(1_000, ge=1)
    items: int = Field(2_000, ge=2)
    # Records per region, counting bot, malformed and duplicate records too.
    events_per_region: int = Field(10_000, ge=1)
    days: float = Field(7.0, gt=0, le=3660)
    # End of the simulated window; None means "now, rounded down to the hour" (resolved once per run).
    end: AwareDatetime | None = None
    bot_share: float = Field(0.02, ge=0, lt=1)
    malformed_share: float = Field(0.01, ge=0, lt=1)
    duplicate_share: float = Field(0.005, ge=0, lt=1)
    # Planted structure: categories map onto latent topics; vectors live in latent_dim dimensions.
    categories: int = Field(20, ge=1, le=1_000)
    topics: int = Field(8, ge=1, le=256)
    latent_dim: int = Field(16, ge=2, le=512)
    # Softmax temperature of user·item affinity: lower means users stick harder to their topics.
    temperature: float = Field(0.15, gt=0)
    zipf_exponent: float = Field(0.8, ge=0, le=5)
    # Share of items first seen inside the window (the rest existed before it starts).
    new_item_share: float = Field(0.2, ge=0, lt=1)
    bots_per_region: int = Field(2, ge=1, le=1_000)
    # Sustained events per second of one bot (humans manage a few per minute).
    bot_rate_per_s: float = Field(5.0, gt=0)

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one region is needed")
        if len(set(v)) != len(v):
            raise ValueError("regions must be distinct")
        return v

    @model_validator(mode="after")
    def _shares(self) -> GeneratorConfig:
        if self.bot_share + self.malformed_share + self.duplicate_share >= 1:
            raise ValueError("bot_share + malformed_share + duplicate_share must be below 1")
        if self.counts_per_region()["valid"] < 1:
            raise ValueError("events_per_region is too small for the shares: no valid event would remain")
        return self

    def counts_per_region(self) -> dict[str, int]:
        """Records of each kind that one region gets; they add up to ``events_per_region``."""
        n = self.events_per_region
        malformed = round(n * self.malformed_share)
        duplicate = round(n * self.duplicate_share)
        bot = round(n * self.bot_share)
        return {
            "valid": n - malformed - duplicate - bot,
            "bot": bot,
            "malformed": malformed,
            "duplicate": duplicate,
        }

    def resolved(self) -> GeneratorConfig:
        """This config with ``end`` fixed, so every part of one run sees the same window."""
        if self.end is not None:
            return self
        return self.model_copy(update={"end": floor_to_hour(datetime.now(UTC))})

    @property
    def window(self) -> tuple[datetime, datetime]:
        end = self.resolved().end
        assert end is not None
        return end - timedelta(days=self.days), end
