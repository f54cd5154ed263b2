"""Exporters: a lowbit checkpoint (or a plain model) -> the formats inference engines read."""

from lowbit.export.api import EXPORT_FORMATS, ExportOptions, export

__all__ = ["EXPORT_FORMATS", "ExportOptions", "export"]
