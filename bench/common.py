"""Helpers shared by the bench scripts: load a config file by name, apply key=value overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG_DIR = os.path.join(ROOT, "configs")


def load_config(name: str):
  """'fashion_mnist' or 'fashion_mnist:full' -> configs/fashion_mnist.py's get_config(variant)."""
  file, _, variant = name.partition(":")
  spec = importlib.util.spec_from_file_location(file, os.path.join(CONFIG_DIR, file + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def apply_overrides(config, overrides):
  """'model.ch=16' style overrides, values parsed as Python literals where they parse."""
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def print_table(rows: list[dict]) -> None:
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |")
