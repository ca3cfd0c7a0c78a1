"""The OpenAPI 3.1 description of /api/v1, written by hand so it says what the endpoints promise."""

from __future__ import annotations

from typing import Any

from farm.assets import MAX_UPLOADED_FILES
from farm.states import BatchStatus, CandidateStatus, ItemStatus, RoundKind

ERRORS_REF = {"$ref": "#/components/responses/Errors"}
ERRORS_SCHEMA = {"$ref": "#/components/schemas/Errors"}
NOT_FOUND_REF = {"$ref": "#/components/responses/NotFound"}
UNAUTHORIZED_REF = {"$ref": "#/components/responses/Unauthorized"}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "The batch id returned by POST /batches."}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    manifest_body = {"type": "string", "description": "The batch manifest in YAML (see GET /schema)."}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "farm API",
            "version": "1",
            "description": (
                "Submit YAML batch manifests to the image-generation farm and follow them. Every figure "
                "comes from the farm's SQL records. When FARM_WEB_TOKEN is set, every endpoint needs "
                "`Authorization: Bearer <token>`. Outside /api/v1 and without auth: `/healthz` (readiness: "
                "200 with {\"ok\": true, \"database\": \"ok\"}, 503 when the database does not answer) "
                "and `/metrics` (Prometheus text format)."
            ),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}, {}],
        "paths": {
            "/batches": {
                "post": {
                    "summary": "Submit a batch (or preview it with dry_run=1)",
                    "operationId": "createBatch",
                    "parameters": [{"name": "dry_run", "in": "query", "required": False,
                                    "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                                    "description": "Validate and count only; nothing is written or sent."}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "text/yaml": {"schema": manifest_body},
                            "application/x-yaml": {"schema": manifest_body},
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["manifest"],
                                    "properties": {
                                        "manifest": {"type": "string", "contentMediaType": "text/yaml"},
                                        "files": {
                                            "type": "array",
                                            "maxItems": MAX_UPLOADED_FILES,
                                            "items": {"type": "string", "contentMediaType":
                                                      "application/octet-stream"},
                                            "description": (
                                                "Files the manifest names (e.g. moderation.pdq_blocklist), "
                                                "each by its file name alone: 1 to 128 letters, digits, '.', "
                                                "'_' or '-', starting with a letter or digit. At most "
                                                "FARM_MAX_ASSET_BYTES each; a file the manifest does not "
                                                "name is refused. Stored with the batch once the manifest "
                                                "is valid, not at all otherwise. An uploaded manifest may "
                                                "name no other file than these and those inside the "
                                                "folders listed in FARM_ASSET_DIRS."
                                            ),
                                        },
                                    },
                                },
                                "encoding": {"files": {"contentType": "application/octet-stream"}},
                            },
                        },
                    },
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/Submitted"}, "Accepted: rows written, "
                                     "batch handed to the control queue."),
                        "200": _json({"$ref": "#/components/schemas/DryRun"}, "The dry run's counts."),
                        "400": ERRORS_REF,
                        "401": UNAUTHORIZED_REF,
                        "413": ERRORS_REF,
                        "503": ERRORS_REF,
                    },
                },
                "get": {
                    "summary": "List batches, newest first",
                    "operationId": "listBatches",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                    "maximum": 1000, "default": 100}},
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    ],
                    "responses": {
                        "200": _json({"type": "object", "properties": {
                            "batches": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}},
                            "total": {"type": "integer"}, "limit": {"type": "integer"},
                            "offset": {"type": "integer"}}}, "Batches without their items."),
                        "401": UNAUTHORIZED_REF,
                    },
                },
            },
            "/batches/{batch_id}": {
                "get": {
                    "summary": "One batch with its items and every candidate",
                    "operationId": "getBatch",
                    "parameters": [BATCH_ID, {"name": "items", "in": "query", "schema": {"type": "string",
                                                                                        "enum": ["0", "1"]},
                                              "description": "items=0 leaves the items out."}],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Batch"}, "The batch."),
                                  "401": UNAUTHORIZED_REF, "404": NOT_FOUND_REF},
                }
            },
            "/batches/{batch_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued or running batch",
                    "operationId": "cancelBatch",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "202": _json({"type": "object", "properties": {"id": {"type": "string"},
                                                                       "cancelled": {"type": "boolean"}}},
                                     "Cancelled: no new work starts; running slices stop at the next stage."),
                        "401": UNAUTHORIZED_REF, "404": NOT_FOUND_REF,
                        "409": ERRORS_REF, "503": ERRORS_REF,
                    },
                }
            },
            "/batches/{batch_id}/retry": {
                "post": {
                    "summary": "Retry the failed candidates of a done batch",
                    "description": (
                        "Failed candidates go back to pending (error and per-stage attempt counts cleared, "
                        "the total `attempts` kept); their items and the batch go back to running and are "
                        "ranked again when the retried candidates settle. A candidate whose input keeps "
                        "failing fails again, with its attempts counted."
                    ),
                    "operationId": "retryBatch",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/Retried"},
                                     "Sent: `retried` candidates are running again."),
                        "200": _json({"$ref": "#/components/schemas/Retried"},
                                     "Nothing to do: the batch has no failed candidates (`retried` is 0)."),
                        "401": UNAUTHORIZED_REF, "404": NOT_FOUND_REF,
                        "409": ERRORS_REF, "503": ERRORS_REF,
                    },
                }
            },
            "/batches/{batch_id}/resume": {
                "post": {
                    "summary": "Resume a queued or running batch that was interrupted",
                    "description": (
                        "Re-sends the unsettled candidates of every running item (a rank where all are "
                        "settled) and the batch's dispatch when items are still pending. Safe to repeat: the "
                        "stages skip work that is already done."
                    ),
                    "operationId": "resumeBatch",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "202": _json({"type": "object", "properties": {
                            "id": {"type": "string"},
                            "messages": {"type": "integer", "description": "Messages sent to the broker."}}},
                            "Sent."),
                        "401": UNAUTHORIZED_REF, "404": NOT_FOUND_REF,
                        "409": ERRORS_REF, "503": ERRORS_REF,
                    },
                }
            },
            "/batches/{batch_id}/export": {
                "get": {
                    "summary": "The winners as a zip: PNG images, a JSON sidecar beside each, batch.json, "
                               "manifest.yaml",
                    "operationId": "exportBatch",
                    "parameters": [BATCH_ID],
                    "responses": {
                        "200": {"description": "The zip.", "content": {"application/zip": {
                            "schema": {"type": "string", "contentMediaType": "application/zip"}}}},
                        "401": UNAUTHORIZED_REF, "404": NOT_FOUND_REF,
                    },
                }
            },
            "/workers": {
                "get": {
                    "summary": "Workers from their heartbeat rows",
                    "operationId": "listWorkers",
                    "responses": {
                        "200": _json({"type": "object", "properties": {"workers": {
                            "type": "array", "items": {"$ref": "#/components/schemas/Worker"}}}}, "Workers."),
                        "401": UNAUTHORIZED_REF,
                    },
                }
            },
            "/schema": {
                "get": {
                    "summary": "The manifest's JSON Schema (draft 2020-12)",
                    "operationId": "manifestSchema",
                    "responses": {"200": {"description": "JSON Schema.", "content": {
                        "application/schema+json": {"schema": {"type": "object"}}}},
                        "401": UNAUTHORIZED_REF},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1."), "401": UNAUTHORIZED_REF},
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The value of FARM_WEB_TOKEN."}},
            "responses": {
                "Errors": _json(ERRORS_SCHEMA, "What was wrong, one entry per problem."),
                "NotFound": _json(ERRORS_SCHEMA, "No such batch or endpoint."),
                "Unauthorized": _json(ERRORS_SCHEMA, "Missing or wrong bearer token."),
            },
            "schemas": {
                "Errors": {
                    "type": "object", "required": ["errors"],
                    "properties": {"errors": {"type": "array", "items": {
                        "type": "object", "required": ["path", "message"],
                        "properties": {
                            "path": {"type": ["string", "null"],
                                     "description": "The manifest field, e.g. items[3].size; null when the "
                                                    "problem is not about one field."},
                            "message": {"type": "string"}}}}},
                },
                "Retried": {"type": "object", "required": ["id", "retried"], "properties": {
                    "id": {"type": "string"}, "retried": {"type": "integer"}}},
                "Submitted": {"type": "object", "required": ["id"], "properties": {
                    "id": {"type": "string"}, "items": {"type": "integer"},
                    "candidates": {"type": "integer"}}},
                "DryRun": {"type": "object", "properties": {
                    "dry_run": {"const": True},
                    "summary": {"type": "object", "properties": {
                        "name": {"type": "string"}, "model": {"type": "string"}, "items": {"type": "integer"},
                        "candidates": {"type": "integer"}, "slices": {"type": "integer"},
                        "denoising_steps": {"type": "integer"}, "sizes": {"type": "object"},
                        "prompts": {"type": "array", "description": "Each item's final prompt (styles and "
                                    "wildcards applied), the first prompts_shown items.",
                                    "items": {"type": "object", "properties": {
                                        "index": {"type": "integer"}, "source": {"type": "string"},
                                        "prompt": {"type": "string"},
                                        "negative_prompt": {"type": ["string", "null"]},
                                        "styles": {"type": "array", "items": {"type": "string"}}}}},
                        "prompts_shown": {"type": "integer"}}}}},
                "Progress": {"type": "object", "additionalProperties": {"type": "integer"},
                             "description": "Candidates by status, plus done (final) and total."},
                "Candidate": {"type": "object", "properties": {
                    "id": {"type": "string"}, "index": {"type": "integer"}, "seed": {"type": "integer"},
                    "status": {"type": "string", "enum": [s.value for s in CandidateStatus]},
                    "stage": {"type": ["string", "null"]}, "image_path": {"type": ["string", "null"]},
                    "verdict": {"type": ["string", "null"]}, "reasons": {"type": "array"},
                    "moderation": {"type": "array", "items": {"type": "object", "properties": {
                        "layer": {"type": "string"}, "verdict": {"type": "string"},
                        "reason": {"type": "string"}, "details": {"type": "object"}}}},
                    "alignment": {"type": ["number", "null"]}, "preference": {"type": ["number", "null"]},
                    "score": {"type": ["number", "null"]}, "rank": {"type": ["integer", "null"]},
                    "is_winner": {"type": "boolean"}, "timings": {"type": "object"},
                    "error": {"type": ["string", "null"]}}},
                "Item": {"type": "object", "properties": {
                    "id": {"type": "string"}, "index": {"type": "integer"}, "prompt": {"type": "string"},
                    "source": {"type": "string"}, "params": {"type": "object"},
                    "status": {"type": "string", "enum": [s.value for s in ItemStatus]},
                    "winners": {"type": "array", "items": {"type": "string"},
                                "description": "Candidate ids, best first: the latest round's winners."},
                    "rounds": {"type": "array", "items": {"$ref": "#/components/schemas/Round"},
                               "description": "The item's ranking rounds, oldest first; none before its "
                                              "first rank (nor for items ranked before rounds were kept)."},
                    "candidates": {"type": "array", "items": {"$ref": "#/components/schemas/Candidate"}}}},
                "Round": {"type": "object", "properties": {
                    "number": {"type": "integer", "minimum": 0, "description": "0-based, in order written."},
                    "kind": {"type": "string", "enum": [k.value for k in RoundKind],
                             "description": "top_up: a rank that found too few passing and added candidates "
                                            "(winners: those the item had then); ranked: the rank that "
                                            "closed the item."},
                    "winners": {"type": "array", "items": {"type": "string"}},
                    "created_at": {"type": "string", "format": "date-time"}},
                    "required": ["number", "kind", "winners", "created_at"]},
                "Batch": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"},
                    "status": {"type": "string",
                               "enum": [s.value for s in BatchStatus],
                               "description": "cancelling: cancelled, with slices in flight still stopping."},
                    "model": {"type": "string"}, "priority": {"type": "integer"}, "tags": {},
                    "items_total": {"type": "integer"}, "items_done": {"type": "integer"},
                    "candidates_total": {"type": "integer"},
                    "progress": {"$ref": "#/components/schemas/Progress"},
                    "throughput": {"type": ["number", "null"], "description": "Final candidates per second."},
                    "eta_seconds": {"type": ["number", "null"]},
                    "error": {"type": ["string", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "finished_at": {"type": ["string", "null"], "format": "date-time"},
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}}},
                "Worker": {"type": "object", "properties": {
                    "name": {"type": "string"}, "queue": {"type": "string"}, "device": {"type": "string"},
                    "pid": {"type": "integer"}, "hostname": {"type": "string"},
                    "models": {"type": "object", "additionalProperties": {"type": "integer"},
                               "description": "Model key -> times loaded in this process."},
                    "loaded": {"type": "array", "items": {"type": "string"},
                               "description": "Model keys loaded now (evicted ones are only in models)."},
                    "queues": {"type": "array", "items": {"type": "string"},
                               "description": "Queues consumed now: device, slices and model queues."},
                    "current": {"type": ["string", "null"]}, "tasks_done": {"type": "integer"},
                    "started_at": {"type": "string"}, "heartbeat_at": {"type": "string"},
                    "heartbeat_age_seconds": {"type": "number"}}},
            },
        },
    }
