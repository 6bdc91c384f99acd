"""The download stage's settings: HTTP limits, the network guard's allow-lists, politeness, opt-outs, and the
decode and resize of each image; validated before any work starts."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from curate.config import Resources, StageConfig
from curate.stages.download.guard import parse_host_entry, parse_network_entry
from curate.stages.download.imaging import Interpolation, OutputFormat, ResizeMode, ResizeSpec

USER_AGENT = "curate/0.1 (image-text dataset curation; obeys robots.txt and X-Robots-Tag noai for token 'curate')"


class DownloadConfig(StageConfig):
    stage: Literal["download"] = "download"
    resources: Resources = Field(default_factory=lambda: Resources(cpus=0.5, batch_size=128))
    threads: int = Field(32, ge=1, description="concurrent requests per worker")
    timeout: float = Field(10.0, gt=0, description="total seconds per attempt, body included")
    connect_timeout: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, description="extra attempts after a timeout, connection error, 429 or 5xx")
    backoff: float = Field(0.5, ge=0, description="base seconds of exponential backoff (with jitter)")
    max_retry_after: float = Field(30.0, ge=0, description="longest Retry-After we wait for")
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(32 * 2**20, ge=1, description="largest body accepted, whatever Content-Length says")
    allow_private_networks: bool = Field(
        False, description="allow loopback, private, link-local and other non-public addresses (off: SSRF guard)")
    allowed_networks: list[str] = Field(
        default_factory=list, description=(
            "CIDRs allowed even though not public, e.g. an internal mirror: '10.1.2.0/24' opens ports 80 and 443 only, "
            "'10.1.2.0/24:8080' that port, '10.1.2.0/24:*' every port ('[fd00::/8]:8080' for IPv6); a redirect from "
            "a public address into them is refused (download:blocked_redirect)"))
    allowed_hosts: list[str] = Field(
        default_factory=list, description=(
            "host names trusted whatever they resolve to, e.g. an internal mirror: 'mirror.internal' opens ports 80 "
            "and 443 only, 'mirror.internal:8080' that port, 'mirror.internal:*' every port; a redirect from a public "
            "address to them is refused (download:blocked_redirect)"))
    per_host_concurrency: int = Field(16, ge=1, description="requests in flight to one host, per worker")
    per_host_rate: float | None = Field(None, gt=0, description="requests a second to one host, per worker")
    dns_cache_seconds: float = Field(300.0, ge=0, description="how long a worker reuses a DNS answer")
    user_agent: str = USER_AGENT
    user_agent_token: str = Field("curate", description="the product token robots.txt and X-Robots-Tag address")
    respect_robots_txt: bool = Field(True, description="robots.txt disallow → filtered, optout:robots_txt")
    respect_x_robots_tag: bool = Field(
        True, description="X-Robots-Tag noai/noimageai/noindex/noimageindex → filtered, optout:x_robots_tag")
    image_size: int = Field(256, ge=1)
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    output_format: OutputFormat = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(math.inf, gt=0)
    max_image_pixels: int = Field(89_478_485, ge=1, description="refuse larger images before decoding them")
    decode_memory_mb: int = Field(
        768, ge=16, description=(
            "memory one worker's decodes may hold at once, counted by mode, format and step; large images wait for "
            "their turn, and one that needs more than all of it is decode:over_budget (at 768: RGBA over ~81 MP, "
            "LA over ~56 MP, WebP over ~35 MP)"))

    @model_validator(mode="after")
    def _token_in_user_agent(self) -> "DownloadConfig":
        if self.user_agent_token.lower() not in self.user_agent.lower():
            raise ValueError(f"user_agent must carry user_agent_token '{self.user_agent_token}' so publishers' "
                             "robots.txt rules can address it")
        return self

    @model_validator(mode="after")
    def _output_fits_the_pixel_limit(self) -> "DownloadConfig":
        if self.resize_mode in ("border", "center_crop") and self.image_size ** 2 > self.max_image_pixels:
            raise ValueError(f"image_size {self.image_size} makes {self.image_size ** 2} pixels, over max_image_pixels "
                             f"{self.max_image_pixels}: every {self.resize_mode} row would be refused; lower "
                             "image_size or raise max_image_pixels")
        return self

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_network_entry(item)  # its ValueError names the entry and the forms expected
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_entry(item)
        return value

    def resize_spec(self) -> ResizeSpec:
        return ResizeSpec(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            upscale_interpolation=self.upscale_interpolation,
            downscale_interpolation=self.downscale_interpolation,
            output_format=self.output_format,
            encode_quality=self.encode_quality,
            min_image_size=self.min_image_size,
            max_aspect_ratio=self.max_aspect_ratio,
            max_image_pixels=self.max_image_pixels,
        )
