-- ich-node routing rule for Orthanc: send each stable head CT series to the node.
--
-- Orthanc 1.10 or later. Install: copy this file next to orthanc.json (e.g. /etc/orthanc/ich-node/),
-- list it in "LuaScripts", and declare the node in "DicomModalities" under the
-- name below ("ich-node"). See docs/routing.md.
--
-- A series is sent when ALL of these hold (checked on its first instance):
--   1. SOP Class is CT Image Storage or Enhanced CT Image Storage. This is what
--      keeps the node's own results (SR, Secondary Capture heatmaps) and every
--      other object (MR, dose reports, presentation states) from being routed:
--      never route the node's results back to it.
--   2. Modality is CT.
--   3. It is a head: BodyPartExamined names the head; or, when BodyPartExamined
--      is absent or empty (common on real head CTs), the study description,
--      series description or protocol name does. A BodyPartExamined that names
--      another part (CHEST, ABDOMEN...) is trusted and the series is not sent.
--   4. It is not a localizer/scout/dose screen (ImageType LOCALIZER, or the
--      series description), and not a derived image unless ROUTE_DERIVED is true
--      (reformats duplicate the acquired axial series).
--   5. It was not made by ich-node (Manufacturer "ich-node", or a series
--      description starting with "ICH AI"): a second guard against loops.
-- The node applies its own, stricter rules (config/node.yaml, `series:`) too.

-- Name of the node in "DicomModalities" (the key, not its AE title).
ICH_NODE_MODALITY = 'ich-node'
-- Route DERIVED images (MPR reformats) as well as ORIGINAL ones.
ROUTE_DERIVED = false

local CT_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.2'] = true,    -- CT Image Storage
  ['1.2.840.10008.5.1.4.1.1.2.1'] = true,  -- Enhanced CT Image Storage
}

-- Upper-case substrings that name the head (several languages' scanner defaults).
local HEAD_WORDS = { 'HEAD', 'BRAIN', 'SKULL', 'CRANI', 'CEREBR', 'NEURO',
                     'KOPF', 'SCHAEDEL', 'SCHADEL', 'CRANE', 'CRANEO', 'CERVEAU' }
local SKIP_WORDS = { 'SCOUT', 'LOCALIZER', 'TOPOGRAM', 'SURVIEW', 'DOSE' }

local function upper(value)
  if type(value) ~= 'string' then
    return ''
  end
  return string.upper(value)
end

local function contains_any(text, words)
  for _, word in ipairs(words) do
    if string.find(text, word, 1, true) then
      return true
    end
  end
  return false
end

local function is_head(tags)
  local body_part = upper(tags['BodyPartExamined'])
  if body_part:match('%S') then
    return contains_any(body_part, HEAD_WORDS)
  end
  for _, key in ipairs({ 'StudyDescription', 'SeriesDescription', 'ProtocolName' }) do
    if contains_any(upper(tags[key]), HEAD_WORDS) then
      return true
    end
  end
  return false
end

-- Why a series is not sent (a string), or nil when it should be.
function IchNodeSkipReason(tags)
  local sop_class = tags['SOPClassUID'] or ''
  if not CT_SOP_CLASSES[sop_class] then
    return 'SOP class ' .. sop_class .. ' is not CT'
  end
  if upper(tags['Modality']) ~= 'CT' then
    return 'modality ' .. upper(tags['Modality']) .. ' is not CT'
  end
  local series_description = upper(tags['SeriesDescription'])
  if upper(tags['Manufacturer']) == 'ICH-NODE' or series_description:find('^ICH AI') then
    return 'made by ich-node'
  end
  if not is_head(tags) then
    return 'not a head (BodyPartExamined "' .. upper(tags['BodyPartExamined']) .. '")'
  end
  local image_type = upper(tags['ImageType'])
  if image_type:find('LOCALIZER', 1, true) or contains_any(series_description, SKIP_WORDS) then
    return 'localizer, scout or dose screen'
  end
  if not ROUTE_DERIVED and image_type:find('^DERIVED') then
    return 'derived image (ImageType ' .. image_type .. ')'
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  if first == nil then
    return
  end
  -- One instance's header carries the study, series and image tags needed here.
  local instance = ParseJson(RestApiGet('/instances/' .. first .. '/tags?simplify'))
  local reason = IchNodeSkipReason(instance)
  if reason ~= nil then
    print('ich-node: not routing series ' .. seriesId .. ': ' .. reason)
    return
  end
  print('ich-node: routing series ' .. seriesId .. ' (' .. #series['Instances'] ..
        ' instances) to ' .. ICH_NODE_MODALITY)
  -- An asynchronous C-STORE job: visible (and retryable) in /jobs and Orthanc
  -- Explorer. (Lua's SendToModality() only takes instances in Orthanc 1.10.)
  local answer = RestApiPost('/modalities/' .. ICH_NODE_MODALITY .. '/store',
    DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
  if answer == nil then
    print('ich-node: could not submit the C-STORE job of series ' .. seriesId)
    return
  end
  print('ich-node: job ' .. ParseJson(answer)['ID'] .. ' sends series ' .. seriesId)
end
