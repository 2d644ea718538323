"""README.md of a converted folder: where the weights come from, how they were made, their
license (carried over from the source model's card and license files), and how to use them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from ..components import COMPONENTS

STABILITY_LICENSE = "Stability AI Community License"


def card_fields(card: Optional[str]) -> Dict[str, str]:
    """`key: value` lines of a model card's YAML front matter (license fields are flat)."""
    if not card or not card.startswith("---"):
        return {}
    end = card.find("\n---", 3)
    fields = {}
    for line in card[3 : end if end > 0 else 0].splitlines():
        m = re.match(r"([A-Za-z_]+):\s*(.+?)\s*\Z", line)
        if m:
            fields[m.group(1)] = m.group(2).strip("'\"")
    return fields


def license_name(source_id: Optional[str], fields: Mapping[str, str]) -> Optional[str]:
    name = fields.get("license_name") or fields.get("license")
    official = source_id is not None and source_id.lower().startswith("stabilityai/stable-diffusion-3")
    if (name and "stabilityai" in name.lower() and "community" in name.lower()) or (not name and official):
        return STABILITY_LICENSE
    return None if name in (None, "other") else name


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _front_matter(fields: Mapping[str, str], lic: Optional[str], source_id: Optional[str],
                  license_names: Sequence[str], quantized: bool) -> list:  # fmt: skip
    front = ["---", f"license: {fields.get('license', 'other')}"]
    if fields.get("license_name") or lic == STABILITY_LICENSE:
        front.append(f"license_name: {fields.get('license_name', 'stabilityai-ai-community')}")
    if license_names:
        front.append(f"license_link: {license_names[0]}")
    elif fields.get("license_link"):
        front.append(f"license_link: {fields['license_link']}")
    if source_id:
        front += [f"base_model: {source_id}"] + (["base_model_relation: quantized"] if quantized else [])
    return front + ["library_name: mlx", "pipeline_tag: text-to-image",
                    "tags:", "- mlx", "- sd35_mlx", "- stable-diffusion", "- text-to-image", "---", ""]  # fmt: skip


def _network_rows(components: Mapping[str, dict]) -> list:
    """One table row per stored network: parameters, how it is stored, its size."""
    rows = []
    for c in COMPONENTS:
        e = components.get(c)
        if e is None:
            continue
        q = e.get("quantization")
        how = (f"{q['bits']}-bit {q['mode']}, group {q['group_size']}" if q and q["mode"] == "affine"
               else q["mode"] if q else e.get("dtype") or "")  # fmt: skip
        rows.append(f"| {c} | {e['parameters'] / 1e6:,.0f} M | {how} | {_gb(e['bytes'])} |")
    return rows


def _license_text(source_link: str, lic: Optional[str], fields: Mapping[str, str], license_names: Sequence[str]) -> str:
    included = ", ".join(f"`{n}`" for n in license_names)
    if lic and license_names:
        return (f"These weights are a conversion of {source_link} and remain under its license, the "
                f"**{lic}**; its text is included ({included}). Use of these weights is subject to its terms.")  # fmt: skip
    if lic:
        link = " and " + fields["license_link"] if fields.get("license_link") else ""
        return (f"These weights are a conversion of {source_link} and remain under its license, the "
                f"**{lic}** (see the source model's card{link}). Use of these weights is subject to its terms.")  # fmt: skip
    if license_names:
        return (f"These weights are a conversion of {source_link} and remain under its license, "
                f"included here as {included}.")  # fmt: skip
    return (f"These weights are a conversion of {source_link}; the license of {source_link} applies "
            "to them (no license file was found in the source to copy: see the source model's card).")  # fmt: skip


def model_card(config: dict, *, source_card: Optional[str] = None, license_names: Sequence[str] = (),
               upload_repo: Optional[str] = None) -> str:  # fmt: skip
    """README.md of a converted folder: where it comes from, how it was made, its license."""
    src = config.get("source") or {}
    source_id = src.get("repo_id")
    source_label = source_id or (Path(src["path"]).name if src.get("path") else "the original model")
    source_link = f"[{source_id}](https://huggingface.co/{source_id})" if source_id else f"`{source_label}`"
    fields = card_fields(source_card)
    lic = license_name(source_id, fields)
    quantized = any(e.get("quantization") for e in config["components"].values())
    front = _front_matter(fields, lic, source_id, license_names, quantized)
    name = upload_repo or source_label + "-mlx"
    t5_note = {"dropped": "\nT5-XXL was left out (`--drop-t5`): generation runs in T5-drop mode "
                          "(zeros stand in for its tokens).\n"}.get(config.get("t5"), "")  # fmt: skip
    model_ref = upload_repo or "path/to/this/folder"
    body = [
        f"# {name}", "",
        f"{source_link}, converted to the MLX format of sd35_mlx with sd35_mlx "
        f"{config['sd35_mlx_version']} (converted format version {config['format_version']})."
        + (f" Variant: {config['variant']}." if config.get("variant") else ""), "",
        "| network | parameters | stored as | size |", "|---|---|---|---|", *_network_rows(config["components"]), t5_note,
        "## Use", "", "```bash", "pip install sd35_mlx",
        f'python -m sd35_mlx.generate --model {model_ref} --prompt "a photo of an astronaut riding a horse"',
        "```", "", "```python", "from sd35_mlx import SD35Pipeline", "",
        f'pipe = SD35Pipeline.from_pretrained("{model_ref}")',
        'pipe.generate("a photo of an astronaut riding a horse", seed=0).image.save("out.png")', "```", "",
        "## License", "", _license_text(source_link, lic, fields, license_names),
    ]  # fmt: skip
    return "\n".join(front + body) + "\n"
