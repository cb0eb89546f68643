"""Core services the trainers share: trees and paths, sharding, checkpoints, console."""
